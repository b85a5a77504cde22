/* Threads parked in each kind of blocking call, checking after every call that it
 * behaved: no spurious errors (EINTR allowed only from epoll_wait), sleeps not shortened,
 * signal mask unchanged. One thread ("sig") takes signal TSIG and counts it.
 *
 *   parked [HEAP_MIB]   prints "NAME TID" per thread, then "ready"; on "stop" or EOF
 *                       on stdin prints "result NAME ITERATIONS ERRORS EINTR" per thread,
 *                       "signals N", and exits 0; "sigs" prints "signals N".
 * HEAP_MIB of 6 KiB blocks with every other one freed make malloc_trim take a while. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <stddef.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define TSIG 40
enum { T_SELECT, T_POLL, T_EPOLL, T_ACCEPT, T_READ, T_NANOSLEEP, T_CLOCK_NANOSLEEP, T_COND, T_SIG, N };
static const char *names[N] = {"select", "poll", "epoll_wait", "accept", "read",
                               "nanosleep", "clock_nanosleep", "cond", "sig"};
static atomic_long iters[N], errs[N], eintrs[N], sigs;
static atomic_int stop;
static int pipefd[2], sp[2], lfd, ep;
static struct sockaddr_un addr;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t out = PTHREAD_MUTEX_INITIALIZER;

static void fail(int t, const char *what) {
    if (errs[t]++ < 3) fprintf(stderr, "%s: %s (errno %d)\n", names[t], what, errno);
}
static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}
static void on_sig(int s) { (void)s; sigs++; }

static void mask_for(int t, sigset_t *m) {
    sigemptyset(m);
    sigaddset(m, SIGUSR2);
    if (t != T_SIG) sigaddset(m, TSIG);
}

static void *run(void *arg) {
    int t = (int)(long)arg;
    sigset_t want, cur;
    mask_for(t, &want);
    pthread_sigmask(SIG_SETMASK, &want, NULL);
    pthread_mutex_lock(&out);
    printf("%s %d\n", names[t], gettid());
    pthread_mutex_unlock(&out);
    char buf[8];
    const long long sleep_ns = 100000000LL;
    while (!stop) {
        int n;
        long long t0 = now_ns();
        struct timespec ts = {0, sleep_ns}, rem;
        switch (t) {
        case T_SELECT: {
            fd_set r;
            FD_ZERO(&r);
            FD_SET(pipefd[0], &r);
            struct timeval tv = {0, 50000};
            if ((n = select(pipefd[0] + 1, &r, NULL, NULL, &tv)) != 0) fail(t, "select returned nonzero");
            break;
        }
        case T_POLL: {
            struct pollfd p = {pipefd[0], POLLIN, 0};
            if ((n = poll(&p, 1, 50)) != 0) fail(t, "poll returned nonzero");
            break;
        }
        case T_EPOLL: {
            struct epoll_event ev[2];
            n = epoll_wait(ep, ev, 2, 50);
            if (n == -1 && errno == EINTR) eintrs[t]++;
            else if (n != 0) fail(t, "epoll_wait returned nonzero");
            break;
        }
        case T_ACCEPT: {
            int c = accept(lfd, NULL, NULL);
            if (c < 0) fail(t, "accept failed");
            else close(c);
            break;
        }
        case T_READ:
            n = read(sp[0], buf, 1);
            if (n != 1) fail(t, "read failed");
            break;
        case T_NANOSLEEP:
            if (nanosleep(&ts, NULL) != 0) fail(t, "nanosleep failed");
            else if (now_ns() - t0 < sleep_ns) fail(t, "nanosleep shortened");
            break;
        case T_CLOCK_NANOSLEEP:
            if ((n = clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL)) != 0) { errno = n; fail(t, "clock_nanosleep failed"); }
            else if (now_ns() - t0 < sleep_ns) fail(t, "clock_nanosleep shortened");
            break;
        case T_COND:
            pthread_mutex_lock(&mu);
            while (!stop) pthread_cond_wait(&cv, &mu);
            pthread_mutex_unlock(&mu);
            break;
        case T_SIG:
            while (nanosleep(&ts, &rem) == -1 && errno == EINTR) ts = rem;
            if (now_ns() - t0 < sleep_ns) fail(t, "sleep shortened");
            break;
        }
        pthread_sigmask(SIG_SETMASK, NULL, &cur);
        for (int s = 1; s < 65; s++)
            if (sigismember(&cur, s) != sigismember(&want, s)) { fail(t, "signal mask changed"); break; }
        iters[t]++;
    }
    return NULL;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    long mib = argc > 1 ? atol(argv[1]) : 0;
    size_t nblk = (size_t)mib * 1024 * 1024 / 6144;
    void **blk = calloc(nblk + 1, sizeof(void *));
    for (size_t i = 0; i < nblk; i++) { blk[i] = malloc(6144); memset(blk[i], 1, 6144); }
    for (size_t i = 0; i < nblk; i += 2) free(blk[i]);

    struct sigaction sa = {0};
    sa.sa_handler = on_sig;
    sa.sa_flags = SA_RESTART;
    sigaction(TSIG, &sa, NULL);
    sigset_t m;
    mask_for(-1, &m);
    pthread_sigmask(SIG_SETMASK, &m, NULL);

    if (pipe(pipefd) || socketpair(AF_UNIX, SOCK_STREAM, 0, sp)) return 1;
    ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN};
    epoll_ctl(ep, EPOLL_CTL_ADD, pipefd[0], &ev);
    lfd = socket(AF_UNIX, SOCK_STREAM, 0);
    addr.sun_family = AF_UNIX;
    snprintf(addr.sun_path + 1, sizeof addr.sun_path - 1, "parked-%d", getpid());
    socklen_t alen = offsetof(struct sockaddr_un, sun_path) + 1 + strlen(addr.sun_path + 1);
    if (bind(lfd, (struct sockaddr *)&addr, alen) || listen(lfd, 8)) return 1;

    pthread_t th[N];
    for (long t = 0; t < N; t++) pthread_create(&th[t], NULL, run, (void *)t);
    usleep(100000);
    printf("ready\n");

    char line[64];
    while (fgets(line, sizeof line, stdin) && strncmp(line, "stop", 4) != 0)
        if (strncmp(line, "sigs", 4) == 0) printf("signals %ld\n", (long)sigs);
    stop = 1;
    int c = socket(AF_UNIX, SOCK_STREAM, 0);
    if (connect(c, (struct sockaddr *)&addr, alen)) { errs[T_ACCEPT]++; fprintf(stderr, "connect failed\n"); }
    if (write(sp[1], "q", 1) != 1) errs[T_READ]++;
    pthread_mutex_lock(&mu);
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    for (int t = 0; t < N; t++) pthread_join(th[t], NULL);
    for (int t = 0; t < N; t++) printf("result %s %ld %ld %ld\n", names[t], iters[t], errs[t], eintrs[t]);
    printf("signals %ld\n", (long)sigs);
    return 0;
}
