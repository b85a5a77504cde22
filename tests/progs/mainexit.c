/* A live process whose main thread has exited (pthread_exit): a second thread reads
 * stdin (a pipe). Prints "ready" once the main thread is gone; exits 0 at EOF. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static void *run(void *arg) {
    (void)arg;
    for (int i = 0; i < 64; i++) free(malloc(70000 + i));
    usleep(50000);
    printf("ready\n");
    fflush(stdout);
    char buf[64];
    while (read(0, buf, sizeof buf) > 0) {
    }
    exit(0);
}

int main(void) {
    pthread_t t;
    pthread_create(&t, NULL, run, NULL);
    pthread_exit(NULL);
}
