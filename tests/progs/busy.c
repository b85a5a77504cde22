/* No thread parked in a safe syscall: the main thread joins (futex), one thread waits on
 * a condition variable (futex), one spins in user code. Prints "ready"; the spinner's
 * counter shows it kept running. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <unistd.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static atomic_ulong spins;

static void *waiter(void *a) {
    (void)a;
    pthread_mutex_lock(&mu);
    for (;;) pthread_cond_wait(&cv, &mu);
    return NULL;
}
static void *spinner(void *a) {
    (void)a;
    for (;;) spins++;
    return NULL;
}
int main(void) {
    pthread_t a, b;
    pthread_create(&a, NULL, waiter, NULL);
    pthread_create(&b, NULL, spinner, NULL);
    printf("ready\n");
    fflush(stdout);
    pthread_join(a, NULL);
    return 0;
}
