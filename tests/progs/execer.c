/* A chain of images that exec one another from a second thread, for the exec-during-trim
 * test.
 *
 *   execer N    the main thread blocks reading a pipe nobody writes (a safe place to
 *               inject); a second thread waits a pseudo-random 0-3 ms and execs
 *               `execer N-1`; the last image (N = 0) prints "done" and exits 0.
 * An injection at an address resolved in one image and run in the next crashes it: the
 * chain then ends with a signal instead of "done". */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static char **args;

static void *next(void *arg) {
    long n = (long)arg;
    struct timespec ts = {0, (long)((getpid() * 7919L + n * 104729L) % 3000) * 1000L};
    nanosleep(&ts, NULL);
    char buf[24];
    snprintf(buf, sizeof buf, "%ld", n - 1);
    execl("/proc/self/exe", args[0], buf, (char *)NULL);
    perror("exec");
    exit(3);
}

int main(int argc, char **argv) {
    args = argv;
    long n = argc > 1 ? atol(argv[1]) : 0;
    if (n <= 0) {
        printf("done\n");
        return 0;
    }
    /* Some heap, so that malloc_trim has work. */
    for (int i = 0; i < 64; i++) free(malloc(5000 + i));
    int p[2];
    if (pipe(p)) return 2;
    pthread_t t;
    pthread_create(&t, NULL, next, (void *)n);
    char c;
    if (read(p[0], &c, 1) < 0) perror("read");
    return 4;
}
