"""The RDP accountant as an HTTP service (``privfed-accountant serve``) and its client library.

The service and the embedded backend share one ledger (privacy/ledger.py): same schema, same
answers. See app.py for the API, auth.py for tokens, client.py for the retrying client.
"""
