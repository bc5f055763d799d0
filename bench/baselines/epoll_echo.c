/* The smallest fast echo server: one thread, one epoll loop, non-blocking sockets.
 *
 * A bench baseline, the physical limit of this machine and client: no interpreter, no
 * logging, no limits. Built by bench/run.py with the system compiler (cc -O2) at run time.
 *
 * Usage: epoll_echo PORT   (listens on 127.0.0.1; SIGTERM stops it)
 *
 * Flow control as echod's: what was read is written out in full before the connection is
 * read again (EPOLLOUT while a write is pending), so a client that does not read is not
 * buffered without bound. A client's half-close is passed on (shutdown SHUT_WR) once its
 * data is echoed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF 65536
#define EVENTS 256

struct conn {
    int fd;
    size_t len, off; /* bytes read and not yet echoed: buf[off..len) */
    int eof;         /* the client half-closed: shut our side once the echo is out */
    char buf[BUF];
};

static void drop(int ep, struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
}

static void watch(int ep, struct conn *c, unsigned events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Echo until the socket would block; returns 0 when the connection is done. */
static int serve(int ep, struct conn *c) {
    for (;;) {
        while (c->off < c->len) {
            ssize_t n = send(c->fd, c->buf + c->off, c->len - c->off, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN) {
                    watch(ep, c, EPOLLOUT);
                    return 1;
                }
                return 0;
            }
            c->off += (size_t)n;
        }
        c->off = c->len = 0;
        if (c->eof) {
            shutdown(c->fd, SHUT_WR);
            return 0;
        }
        ssize_t n = recv(c->fd, c->buf, BUF, 0);
        if (n < 0) {
            if (errno == EAGAIN) {
                watch(ep, c, EPOLLIN);
                return 1;
            }
            return 0;
        }
        if (n == 0)
            c->eof = 1;
        c->len = (size_t)n;
    }
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s PORT\n", argv[0]);
        return 64;
    }
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 4096) < 0) {
        perror("bind/listen");
        return 1;
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
    struct epoll_event events[EVENTS];
    for (;;) {
        int n = epoll_wait(ep, events, EVENTS, -1);
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c != NULL) {
                if (!serve(ep, c))
                    drop(ep, c);
                continue;
            }
            for (int k = 0; k < 64; k++) { /* a bounded batch of accepts per wake-up */
                int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (fd < 0)
                    break;
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                c = malloc(sizeof *c);
                if (c == NULL) {
                    close(fd);
                    continue;
                }
                c->fd = fd;
                c->len = c->off = 0;
                c->eof = 0;
                struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
            }
        }
    }
}
