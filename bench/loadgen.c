/* Load generator for echo servers in C: checks every echoed byte, costs the client little.
 *
 * bench/loadgen.py's pingpong and churn scenarios, for servers faster than a Python client:
 * on a 2-CPU machine the client shares the CPUs with the server, and a Python client would be
 * the limit for the C and uvloop servers. bench/run.py builds it with cc -O2 at run time and
 * runs one process per CPU; each drives its connections with one epoll loop.
 *
 * Usage: loadgen KIND SIZE CONNS SECONDS PORT SEED     (KIND: pingpong | churn; 127.0.0.1 only)
 *
 * Protocol with the harness, on stdin/stdout: connect (pingpong), print "ready", wait for one
 * line on stdin (the start), run for SECONDS, then print one line of JSON with the counters
 * and a latency histogram ("hist": [[microseconds, count], ...]). At the end of its run each
 * pingpong connection half-closes and must then see EOF and no stray byte. Every loop is
 * bounded in time (the run, then at most DRAIN_S to drain) and by MAX_ROUNDS.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define VARIANTS 8         /* distinct payloads, rotated so stale or crossed data shows */
#define DRAIN_S 5          /* seconds to finish in-flight round trips after the deadline */
#define MAX_ERRORS 100     /* stop opening connections after this many errors */
#define MAX_ROUNDS 50000000LL
#define HIST_FINE 10000    /* 1 us buckets up to 10 ms, then 100 us buckets up to 1 s */
#define HIST_COARSE 9900

enum { CONNECTING, ECHOING, DRAINING, DONE };

struct conn {
    int fd, state, index;
    unsigned events;
    const unsigned char *payload;
    size_t sent, got;
    int64_t t0;
    unsigned char *rbuf;
};

static size_t size;
static int churn;
static struct sockaddr_in addr;
static unsigned char *variants[VARIANTS];
static long long rounds, round_trips, connections, sent_bytes, verified_bytes, mismatches,
    errors, opened;
static uint64_t hist[HIST_FINE + HIST_COARSE];
static int64_t deadline, end_ns;
static int ep, live;
static char first_error[160];

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void error(const char *what) {
    errors++;
    if (!first_error[0])
        snprintf(first_error, sizeof first_error, "%s: %s", what, strerror(errno));
}

static void record(int64_t ns) {
    int64_t us = ns / 1000;
    if (us < HIST_FINE)
        hist[us]++;
    else
        hist[HIST_FINE + (us - HIST_FINE) / 100 < HIST_FINE + HIST_COARSE - 1
                 ? HIST_FINE + (us - HIST_FINE) / 100
                 : HIST_FINE + HIST_COARSE - 1]++;
}

static void watch(struct conn *c, unsigned events) {
    if (events == c->events)
        return; /* skip the epoll_ctl call that changes nothing */
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->events = events;
}

static void finish(struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->state = DONE;
    live--;
}

static int may_start(int64_t now) {
    return now < deadline && rounds < MAX_ROUNDS && errors < MAX_ERRORS;
}

static void open_conn(struct conn *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    c->t0 = now_ns();
    c->state = CONNECTING;
    c->index = (int)opened++;
    if (c->fd < 0 || (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 &&
                      errno != EINPROGRESS)) {
        error("connect");
        if (c->fd >= 0)
            close(c->fd);
        c->state = DONE;
        return;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->events = EPOLLOUT;
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    live++;
}

static void fail(struct conn *c, const char *what) {
    error(what);
    finish(c);
    if (churn && may_start(now_ns()))
        open_conn(c);
}

static void send_some(struct conn *c) {
    while (c->sent < size) {
        ssize_t n = send(c->fd, c->payload + c->sent, size - c->sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) {
                watch(c, EPOLLIN | EPOLLOUT);
                return;
            }
            fail(c, "send");
            return;
        }
        c->sent += (size_t)n;
    }
    watch(c, EPOLLIN);
}

static void begin(struct conn *c, int64_t now) {
    c->payload = variants[(c->index + rounds) % VARIANTS];
    rounds++;
    c->sent = c->got = 0;
    c->state = ECHOING;
    if (!churn)
        c->t0 = now; /* churn measures from the connect */
    sent_bytes += (long long)size;
    send_some(c);
}

static void on_readable(struct conn *c) {
    if (c->state == DRAINING) {
        char extra[4096];
        ssize_t n = recv(c->fd, extra, sizeof extra, 0);
        if (n < 0 && errno == EAGAIN)
            return;
        if (n > 0)
            mismatches++, errno = 0, fail(c, "unexpected bytes after the last round trip");
        else if (n < 0)
            fail(c, "recv after half-close");
        else
            finish(c);
        return;
    }
    ssize_t n = recv(c->fd, c->rbuf + c->got, size - c->got, 0);
    if (n < 0) {
        if (errno != EAGAIN)
            fail(c, "recv");
        return;
    }
    if (n == 0) {
        errno = ECONNRESET;
        fail(c, "server closed the connection early");
        return;
    }
    c->got += (size_t)n;
    if (c->got < size)
        return;
    int64_t now = now_ns();
    round_trips++;
    if (memcmp(c->rbuf, c->payload, size) == 0)
        verified_bytes += (long long)size;
    else
        mismatches++;
    record(now - c->t0);
    end_ns = now;
    if (churn) {
        connections++;
        finish(c);
        if (may_start(now))
            open_conn(c);
    } else if (may_start(now)) {
        begin(c, now);
    } else {
        c->state = DRAINING; /* the server must echo nothing more and close its end */
        shutdown(c->fd, SHUT_WR);
        watch(c, EPOLLIN);
    }
}

static void on_writable(struct conn *c) {
    if (c->state == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            errno = err;
            fail(c, "connect");
            return;
        }
        begin(c, now_ns());
    } else if (c->state == ECHOING) {
        send_some(c);
    }
}

static int connect_blocking(struct conn *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        return -1;
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (fcntl(c->fd, F_SETFL, O_NONBLOCK) < 0) /* non-blocking from here on */
        return -1;
    c->index = (int)opened++;
    c->events = EPOLLIN;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    live++;
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s pingpong|churn SIZE CONNS SECONDS PORT SEED\n", argv[0]);
        return 64;
    }
    churn = strcmp(argv[1], "churn") == 0;
    size = (size_t)atol(argv[2]);
    int nconns = atoi(argv[3]);
    double seconds = atof(argv[4]);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)atoi(argv[5]));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    srandom((unsigned)atol(argv[6]));
    if (size == 0 || nconns <= 0 || seconds <= 0) {
        fprintf(stderr, "SIZE, CONNS and SECONDS must be positive\n");
        return 64;
    }
    for (int v = 0; v < VARIANTS; v++) {
        variants[v] = malloc(size);
        for (size_t i = 0; i < size; i++)
            variants[v][i] = (unsigned char)(random() >> 7);
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct conn *conns = calloc((size_t)nconns, sizeof *conns);
    for (int i = 0; i < nconns; i++) {
        conns[i].rbuf = malloc(size);
        if (!churn && connect_blocking(&conns[i]) < 0) {
            printf("failed connect: %s\n", strerror(errno));
            return 1;
        }
    }
    printf("ready\n");
    fflush(stdout);
    char line[16];
    if (fgets(line, sizeof line, stdin) == NULL)
        return 1; /* the harness went away before the start */
    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    int64_t start = now_ns();
    deadline = start + (int64_t)(seconds * 1e9);
    end_ns = start;
    for (int i = 0; i < nconns; i++) {
        if (churn)
            open_conn(&conns[i]);
        else
            begin(&conns[i], now_ns());
    }
    int64_t give_up = deadline + (int64_t)DRAIN_S * 1000000000;
    struct epoll_event events[256];
    for (long long pass = 0; live > 0 && pass < (1LL << 40); pass++) {
        int64_t now = now_ns();
        if (now >= give_up)
            break;
        int n = epoll_wait(ep, events, 256, 100);
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c->state == DONE)
                continue;
            if (events[i].events & EPOLLOUT)
                on_writable(c);
            if (c->state != DONE && c->state != CONNECTING &&
                events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                on_readable(c);
        }
    }
    if (live > 0) {
        errno = ETIMEDOUT;
        error("connections still open after the drain");
    }
    getrusage(RUSAGE_SELF, &ru1);
    double cpu = (double)(ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) +
                 (double)(ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) +
                 (double)(ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6 +
                 (double)(ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;
    printf("{\"round_trips\": %lld, \"connections\": %lld, \"sent_bytes\": %lld, "
           "\"verified_bytes\": %lld, \"mismatches\": %lld, \"errors\": %lld, "
           "\"elapsed_ns\": %lld, \"cpu_s\": %.6f, \"first_error\": \"%s\", \"hist\": [",
           round_trips, connections, sent_bytes, verified_bytes, mismatches, errors,
           (long long)(end_ns - start), cpu, first_error);
    const char *sep = "";
    for (int b = 0; b < HIST_FINE + HIST_COARSE; b++) {
        if (hist[b]) {
            long us = b < HIST_FINE ? b : HIST_FINE + (long)(b - HIST_FINE) * 100;
            printf("%s[%ld, %llu]", sep, us, (unsigned long long)hist[b]);
            sep = ", ";
        }
    }
    printf("]}\n");
    return 0;
}
