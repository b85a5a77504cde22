/* A process under seccomp, parked in read on a pipe (stdin), for the seccomp test.
 *
 *   seccomp_target strict     seccomp strict mode (read/write/exit/sigreturn only)
 *   seccomp_target kill       a filter that kills the process on madvise
 *   seccomp_target trap       a filter that traps madvise (SIGSYS) to its own handler
 * Prints "ready", then reads stdin until EOF and exits 0 (strict: via exit syscall). */
#define _GNU_SOURCE
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static void on_sys(int s) { (void)s; write(2, "SIGSYS handled\n", 15); }

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "kill";
    /* Holes in the heap: malloc_trim has pages to madvise. */
    static void *keep[64];
    for (int i = 0; i < 64; i++) keep[i] = malloc(70000 + i);
    for (int i = 0; i < 64; i += 2) free(keep[i]);
    setvbuf(stdout, NULL, _IONBF, 0);
    if (strcmp(mode, "strict") == 0) {
        printf("ready\n");
        if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT)) return 1;
    } else {
        struct sigaction sa = {0};
        sa.sa_handler = on_sys;
        sigaction(SIGSYS, &sa, NULL);
        unsigned action = strcmp(mode, "trap") == 0 ? SECCOMP_RET_TRAP : SECCOMP_RET_KILL_PROCESS;
        struct sock_filter f[] = {
            BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_madvise, 0, 1),
            BPF_STMT(BPF_RET | BPF_K, action),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        };
        struct sock_fprog prog = {sizeof f / sizeof f[0], f};
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog))
            return 1;
        printf("ready\n");
    }
    char buf[64];
    while (syscall(SYS_read, 0, buf, sizeof buf) > 0) {
    }
    syscall(SYS_exit, 0);
    return 0;
}
