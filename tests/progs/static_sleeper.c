/* Linked with -static: no libc.so mapping, so no malloc_trim to find. */
#include <stdio.h>
#include <unistd.h>
int main(void) {
    printf("ready\n");
    fflush(stdout);
    for (;;) sleep(100);
}
