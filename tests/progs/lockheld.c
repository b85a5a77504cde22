/* A thread stuck inside glibc with the main arena lock held: malloc_stats() prints to
 * stderr under the arena lock, and stderr is a pipe the test keeps full. An injected
 * malloc_trim then waits for that lock (futex) until the test drains the pipe.
 *
 *   lockheld      prints "sleeper TID", "stats TID", "ready"; "done" once malloc_stats
 *                 returned; on "stop" prints "result ITERATIONS ERRORS" for the sleeper. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static atomic_int stop;
static atomic_long iters, errs;

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void *sleeper(void *a) {
    (void)a;
    printf("sleeper %d\n", gettid());
    while (!stop) {
        struct timespec ts = {0, 50000000};
        long long t0 = now_ns();
        if (nanosleep(&ts, NULL) != 0 || now_ns() - t0 < 50000000) errs++;
        iters++;
    }
    return NULL;
}

static void *stats(void *a) {
    (void)a;
    printf("stats %d\n", gettid());
    malloc_stats(); /* blocks writing to the full stderr pipe, main arena locked */
    printf("done\n");
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    free(malloc(100));
    /* Fill the stderr pipe. */
    int fl = fcntl(2, F_GETFL);
    fcntl(2, F_SETFL, fl | O_NONBLOCK);
    char buf[4096];
    memset(buf, 'x', sizeof buf);
    while (write(2, buf, sizeof buf) > 0) {}
    while (write(2, buf, 1) > 0) {}
    fcntl(2, F_SETFL, fl);
    pthread_t s, t;
    pthread_create(&s, NULL, sleeper, NULL);
    usleep(20000);
    pthread_create(&t, NULL, stats, NULL);
    usleep(20000);
    printf("ready\n");
    char line[64];
    while (fgets(line, sizeof line, stdin) && strncmp(line, "stop", 4) != 0) {}
    stop = 1;
    pthread_join(s, NULL);
    printf("result %ld %ld\n", (long)iters, (long)errs);
    return 0;
}
