/* LD_PRELOAD shim for bench/accountant.py --fsync-delay-ms: every fsync/fdatasync first sleeps
   $PRIVFED_FSYNC_DELAY_US microseconds, so that the benchmark can show the fsync-bound regime
   (a busy or networked disk) on a machine whose disk syncs in 0.1 ms. Benchmarks only. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>

static void delay(void) {
    const char *text = getenv("PRIVFED_FSYNC_DELAY_US");
    long us = text ? atol(text) : 0;
    if (us > 0) {
        struct timespec t = {us / 1000000, (us % 1000000) * 1000};
        nanosleep(&t, NULL);
    }
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    delay();
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    delay();
    return real(fd);
}
