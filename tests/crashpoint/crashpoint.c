/*
 * crashpoint.so: stops a process at its Nth durable write, the way a power
 * cut or a kill -9 would, so a test can reach every crash window of a
 * command instead of the few that random kills happen to hit.
 *
 * Preloaded (LD_PRELOAD) into sandboxer-host by tests/e2e/crash_points.rs.
 * It wraps fsync(2) and fdatasync(2), the calls that make redb's commits
 * durable, and counts them across all threads of the process:
 *
 *   SANDBOXER_CRASH_AT=N        SIGKILL the process at the Nth call
 *   SANDBOXER_CRASH_WHEN=before kill before the call reaches the disk
 *                       =after  kill right after it returned (the default)
 *   SANDBOXER_CRASH_COUNT=FILE  write the running count to FILE after each
 *                               call (a dry run learns how many there are)
 *   SANDBOXER_CRASH_PATHS=FILE  append "N path" to FILE for each call (a dry
 *                               run learns which file each one syncs)
 *
 * Its own variables and LD_PRELOAD are removed from the environment when it
 * loads, so programs the host starts are not counted or killed.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static long crash_at = 0;
static int crash_before = 0;
static char count_file[4096];
static char paths_file[4096];
static long calls = 0;

static int (*real_fsync)(int) = 0;
static int (*real_fdatasync)(int) = 0;

__attribute__((constructor)) static void crashpoint_init(void) {
    const char *at = getenv("SANDBOXER_CRASH_AT");
    const char *when = getenv("SANDBOXER_CRASH_WHEN");
    const char *file = getenv("SANDBOXER_CRASH_COUNT");
    const char *paths = getenv("SANDBOXER_CRASH_PATHS");
    if (at) crash_at = strtol(at, 0, 10);
    if (when && strcmp(when, "before") == 0) crash_before = 1;
    if (file) snprintf(count_file, sizeof count_file, "%s", file);
    if (paths) snprintf(paths_file, sizeof paths_file, "%s", paths);
    unsetenv("SANDBOXER_CRASH_AT");
    unsetenv("SANDBOXER_CRASH_WHEN");
    unsetenv("SANDBOXER_CRASH_COUNT");
    unsetenv("SANDBOXER_CRASH_PATHS");
    unsetenv("LD_PRELOAD");
    real_fsync = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
}

static void record(long n) {
    if (!count_file[0]) return;
    char text[32];
    int len = snprintf(text, sizeof text, "%ld\n", n);
    int fd = open(count_file, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
        if (write(fd, text, (size_t)len) < 0) { /* a count lost is a count lost */ }
        close(fd);
    }
}

static void record_path(long n, int fd) {
    if (!paths_file[0]) return;
    char link[64], target[4096], line[4200];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t got = readlink(link, target, sizeof target - 1);
    if (got < 0) got = 0;
    target[got] = 0;
    int len = snprintf(line, sizeof line, "%ld %s\n", n, target);
    int out = open(paths_file, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (out >= 0) {
        if (write(out, line, (size_t)len) < 0) { /* a line lost is a line lost */ }
        close(out);
    }
}

static int durable(int fd, int (*real)(int)) {
    long n = __atomic_add_fetch(&calls, 1, __ATOMIC_SEQ_CST);
    record_path(n, fd);
    if (crash_at == n && crash_before) kill(getpid(), SIGKILL);
    int result = real(fd);
    record(n);
    if (crash_at == n) kill(getpid(), SIGKILL);
    return result;
}

int fsync(int fd) { return durable(fd, real_fsync); }
int fdatasync(int fd) { return durable(fd, real_fdatasync); }
