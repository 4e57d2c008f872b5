/*
 * vchan-peer: a real libxenvchan peer for dombus's VM tests (tests/vm/run-xen).
 *
 * Built by run-xen, statically, against Debian's libxen-dev (libxenvchan.a and
 * friends), and installed as /usr/bin/vchan-peer in the dom0 (and domU)
 * initramfs.
 *
 *   vchan-peer server <peer-domid> <xs-path> <mode>
 *   vchan-peer client <peer-domid> <xs-path> <mode>
 *
 *   mode "echo"     echo every byte back until the peer closes, then print
 *                   "vchan-peer echoed bytes=<n>" and exit 0.
 *   mode "send <N>" write N bytes of the test pattern while reading the echo
 *                   back concurrently; check the echo, then print
 *                   "vchan-peer sent bytes=<N> crc=<crc32> echo=ok" and exit 0.
 *
 * Test pattern: byte i = (uint8_t)(((uint64_t)(i % 65521) * 2654435761) >> 13).
 * The CRC is the IEEE CRC-32 (zlib's crc32()) of the N bytes sent.
 *
 * Environment: VCHAN_PEER_IDLE_TIMEOUT (seconds, default 60): give up when
 * nothing moves for that long (e.g. a server whose client never comes).
 *
 * Notes on libxenvchan (Xen 4.17, tools/libs/vchan):
 *  - server_init publishes <xs-path>/ring-ref and <xs-path>/event-channel in
 *    xenstore (readable by <peer-domid> only) and returns at once; the client
 *    connects later. The server's libxenvchan_is_open() returns 2 until the
 *    client connects, 1 while it is connected and 0 once it has closed.
 *  - client_init fails (NULL) while those keys do not exist yet: we retry.
 *  - init does not set ctrl->blocking (malloc'ed): we set it to 0 ourselves,
 *    so libxenvchan_read/_write never block and return what they could do.
 *  - libxenvchan_wait() reads the event channel fd and would block if no
 *    event is pending: call it only after poll() said the fd is readable.
 *  - libxenvchan_data_ready()/_buffer_space() and the non-blocking read/write
 *    paths register for a notification before returning "nothing", so
 *    polling the fd after they made no progress cannot miss a wake-up.
 *  - The xenstore paths are formatted into 64-byte buffers inside the
 *    library: <xs-path>/event-channel must fit, so xs-path <= 48 chars.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libxenvchan.h>
#include <xentoollog.h>

#define PATTERN_PERIOD 65521u
#define XS_PATH_MAX 48
#define CLIENT_RETRY_SECONDS 20

static uint8_t pattern[PATTERN_PERIOD];
static uint32_t crc_table[256];

static void die(const char *msg)
{
    fprintf(stderr, "vchan-peer: error: %s\n", msg);
    exit(2);
}

/* ---- test pattern and CRC-32 (IEEE 802.3, reflected 0xEDB88320, as zlib) ---- */

static void pattern_init(void)
{
    for (uint32_t i = 0; i < PATTERN_PERIOD; i++)
        pattern[i] = (uint8_t)(((uint64_t)i * 2654435761ULL) >> 13);
}

static void crc32_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[n] = c;
    }
}

/* crc is the running value, starting at 0 (like zlib's crc32(0, ...)). */
static uint32_t crc32_update(uint32_t crc, const uint8_t *buf, size_t len)
{
    crc = ~crc;
    for (size_t i = 0; i < len; i++)
        crc = crc_table[(crc ^ buf[i]) & 0xff] ^ (crc >> 8);
    return ~crc;
}

/* ---- helpers ---- */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double idle_timeout_s(void)
{
    const char *s = getenv("VCHAN_PEER_IDLE_TIMEOUT");
    double v = s ? atof(s) : 60.0;
    return v > 0 ? v : 60.0;
}

/*
 * Nothing could be read or written: sleep until the peer signals the event
 * channel (or up to 200 ms, to re-check liveness), then acknowledge the
 * event so the channel is unmasked again. Returns -1 on an fd error.
 */
static int wait_for_event(struct libxenvchan *ctrl)
{
    struct pollfd pfd = { .fd = libxenvchan_fd_for_select(ctrl), .events = POLLIN };
    int r = poll(&pfd, 1, 200);
    if (r < 0)
        return errno == EINTR ? 0 : -1;
    if (r > 0 && (pfd.revents & POLLIN))
        return libxenvchan_wait(ctrl);
    if (r > 0 && (pfd.revents & (POLLERR | POLLHUP | POLLNVAL)))
        return -1;
    return 0;
}

/* ---- modes ---- */

static int run_echo(struct libxenvchan *ctrl)
{
    static uint8_t pend[65536];
    size_t plen = 0;
    unsigned long long echoed = 0;
    double idle = idle_timeout_s(), last = now_s();
    int connected = 0;

    for (;;) {
        int progress = 0, peer_gone = 0;

        if (plen < sizeof pend) {
            int r = libxenvchan_read(ctrl, pend + plen, sizeof pend - plen);
            if (r > 0) {
                plen += (size_t)r;
                progress = 1;
            } else if (r < 0) {
                peer_gone = 1;
            }
        }
        if (plen > 0 && !peer_gone) {
            int w = libxenvchan_write(ctrl, pend, plen);
            if (w > 0) {
                memmove(pend, pend + w, plen - (size_t)w);
                plen -= (size_t)w;
                echoed += (unsigned long long)w;
                progress = 1;
            } else if (w < 0) {
                peer_gone = 1;
            }
        }
        int open = libxenvchan_is_open(ctrl);
        if (open == 1)
            connected = 1;
        if (peer_gone || open == 0)
            break;
        if (progress) {
            last = now_s();
            continue;
        }
        if (now_s() - last > idle) {
            fprintf(stderr, "vchan-peer: error: echo: %s for %.0f s (echoed %llu bytes)\n",
                    connected ? "peer idle" : "no peer connected", idle, echoed);
            return 1;
        }
        if (wait_for_event(ctrl) < 0) {
            perror("vchan-peer: error: event channel");
            return 1;
        }
    }
    if (plen > 0)
        fprintf(stderr, "vchan-peer: echo: peer closed with %zu bytes not echoed\n", plen);
    printf("vchan-peer echoed bytes=%llu\n", echoed);
    fflush(stdout);
    return 0;
}

static int run_send(struct libxenvchan *ctrl, unsigned long long total)
{
    static uint8_t rbuf[65536];
    unsigned long long sent = 0, recvd = 0;
    uint32_t crc = 0;
    double idle = idle_timeout_s(), last = now_s();

    while (recvd < total) {
        int progress = 0;

        if (sent < total) {
            size_t pos = (size_t)(sent % PATTERN_PERIOD);
            size_t n = PATTERN_PERIOD - pos;
            if (n > total - sent)
                n = (size_t)(total - sent);
            int w = libxenvchan_write(ctrl, pattern + pos, n);
            if (w < 0) {
                fprintf(stderr, "vchan-peer: error: peer gone while sending "
                        "(sent %llu of %llu bytes)\n", sent, total);
                return 1;
            }
            if (w > 0) {
                crc = crc32_update(crc, pattern + pos, (size_t)w);
                sent += (unsigned long long)w;
                progress = 1;
            }
        }

        size_t want = sizeof rbuf;
        if (want > total - recvd)
            want = (size_t)(total - recvd);
        int r = libxenvchan_read(ctrl, rbuf, want);
        if (r < 0) {
            fprintf(stderr, "vchan-peer: error: peer gone before echoing everything "
                    "(sent %llu, echoed %llu of %llu bytes)\n", sent, recvd, total);
            return 1;
        }
        for (int j = 0; j < r; j++) {
            unsigned long long i = recvd + (unsigned long long)j;
            if (rbuf[j] != pattern[i % PATTERN_PERIOD]) {
                printf("DOMBUS-FAIL vchan-peer echo mismatch at byte %llu\n", i);
                fflush(stdout);
                return 1;
            }
        }
        if (r > 0) {
            recvd += (unsigned long long)r;
            progress = 1;
        }

        if (progress) {
            last = now_s();
            continue;
        }
        if (!libxenvchan_is_open(ctrl)) {
            fprintf(stderr, "vchan-peer: error: peer closed before done "
                    "(sent %llu, echoed %llu of %llu bytes)\n", sent, recvd, total);
            return 1;
        }
        if (now_s() - last > idle) {
            fprintf(stderr, "vchan-peer: error: no progress for %.0f s "
                    "(sent %llu, echoed %llu of %llu bytes)\n", idle, sent, recvd, total);
            return 1;
        }
        if (wait_for_event(ctrl) < 0) {
            perror("vchan-peer: error: event channel");
            return 1;
        }
    }
    printf("vchan-peer sent bytes=%llu crc=%08x echo=ok\n", total, crc);
    fflush(stdout);
    return 0;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: vchan-peer server|client <peer-domid> <xs-path> echo\n"
            "       vchan-peer server|client <peer-domid> <xs-path> send <N>\n");
    exit(2);
}

int main(int argc, char **argv)
{
    if (argc < 5)
        usage();
    const char *role = argv[1], *xs_path = argv[3], *mode = argv[4];
    char *end;
    long peer = strtol(argv[2], &end, 10);
    if (*argv[2] == '\0' || *end != '\0' || peer < 0 || peer > 0x7fef)
        die("peer-domid must be a domain id (0..32751)");
    if (strlen(xs_path) == 0 || strlen(xs_path) > XS_PATH_MAX)
        die("xs-path must be 1..48 characters (libxenvchan formats it into 64-byte buffers)");

    unsigned long long total = 0;
    int is_send = 0;
    if (strcmp(mode, "echo") == 0 && argc == 5) {
        is_send = 0;
    } else if (strcmp(mode, "send") == 0 && argc == 6) {
        is_send = 1;
        errno = 0;
        total = strtoull(argv[5], &end, 10);
        if (*argv[5] == '\0' || *end != '\0' || errno)
            die("send: N must be a byte count");
    } else {
        usage();
    }

    pattern_init();
    crc32_init();
    setvbuf(stdout, NULL, _IOLBF, 0);

    xentoollog_logger *logger =
        (xentoollog_logger *)xtl_createlogger_stdiostream(stderr, XTL_ERROR, 0);

    struct libxenvchan *ctrl = NULL;
    if (strcmp(role, "server") == 0) {
        ctrl = libxenvchan_server_init(logger, (int)peer, xs_path, 4096, 4096);
        if (!ctrl) {
            fprintf(stderr, "vchan-peer: error: libxenvchan_server_init(peer %ld, %s) failed: %s\n",
                    peer, xs_path, strerror(errno));
            return 1;
        }
    } else if (strcmp(role, "client") == 0) {
        double deadline = now_s() + CLIENT_RETRY_SECONDS;
        for (;;) {
            ctrl = libxenvchan_client_init(logger, (int)peer, xs_path);
            if (ctrl || now_s() > deadline)
                break;
            usleep(100 * 1000); /* the server has not published its keys yet */
        }
        if (!ctrl) {
            fprintf(stderr, "vchan-peer: error: libxenvchan_client_init(peer %ld, %s) failed "
                    "for %d s: %s\n", peer, xs_path, CLIENT_RETRY_SECONDS, strerror(errno));
            return 1;
        }
    } else {
        usage();
    }
    ctrl->blocking = 0; /* not initialised by libxenvchan: see the notes above */

    int rc = is_send ? run_send(ctrl, total) : run_echo(ctrl);
    libxenvchan_close(ctrl);
    if (logger)
        xtl_logger_destroy(logger);
    return rc;
}
