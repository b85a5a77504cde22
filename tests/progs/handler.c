/* A thread that sleeps inside a signal handler, for the "never inject into a signal
 * handler" test: a handler may have interrupted malloc with an arena lock held.
 *
 *   handler     prints "ready TID"; on "go" on stdin sends itself SIGUSR1, whose handler
 *               prints "in-handler" and sleeps in nanosleep until "stop" (then exits 0).
 *               The handler runs on the thread's stack, or on a sigaltstack with "alt". */
#define _GNU_SOURCE
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <time.h>
#include <unistd.h>

static atomic_int stop;
static pthread_t worker;

static void on_usr1(int s) {
    (void)s;
    static const char msg[] = "in-handler\n";
    write(1, msg, sizeof msg - 1);
    while (!stop) {
        struct timespec ts = {0, 20000000};
        nanosleep(&ts, NULL);
    }
}

static void *run(void *alt) {
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGUSR1);
    pthread_sigmask(SIG_UNBLOCK, &m, NULL);
    if (alt) {
        stack_t ss = {.ss_sp = malloc(1 << 16), .ss_size = 1 << 16, .ss_flags = 0};
        sigaltstack(&ss, NULL);
    }
    printf("ready %d\n", gettid());
    fflush(stdout);
    while (!stop) {
        struct timespec ts = {0, 20000000};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

int main(int argc, char **argv) {
    int alt = argc > 1 && strcmp(argv[1], "alt") == 0;
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sa.sa_flags = alt ? SA_ONSTACK : 0;
    sigaction(SIGUSR1, &sa, NULL);
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &m, NULL);
    pthread_create(&worker, NULL, run, alt ? (void *)1 : NULL);
    char line[32];
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "go", 2) == 0) pthread_kill(worker, SIGUSR1);
        if (strncmp(line, "stop", 4) == 0) break;
    }
    stop = 1;
    pthread_join(worker, NULL);
    return 0;
}
