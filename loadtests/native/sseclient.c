/* The fan-out's load client in C: the streams, the parsing and the figures of loadtests/client.py, at a fraction
 * of its CPU, so that a server's figures are not the client's (loadtests/README.md, "How they run").
 *
 * Usage: sseclient HOST PORT STREAMS EXPECTED CONNECT_TIMEOUT RUN_TIMEOUT CONCURRENCY KEEP_LATENCIES REQUESTS
 *
 * REQUESTS is a file of STREAMS HTTP requests, each as its length in decimal on a line of its own, then its bytes;
 * the client reads it and removes it. Like client.py it prints JSON lines on stdout: {"state": "connected", ...}
 * once every stream has its connected frame, then {"state": "done", ...} with the same figures once every stream
 * has EXPECTED events or RUN_TIMEOUT seconds have passed; {"state": "failed", ...} when the streams cannot open.
 *
 * It speaks what client.py speaks: an HTTP/1.1 response head, then a chunked or a close-delimited body; SSE frames
 * that end in a blank line (LF or CRLF line endings); comments; the connected frame; and the workload's payload,
 * "@<seq>@<sent>@", where sent is the producer's CLOCK_MONOTONIC (Python's time.monotonic()).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_ATTEMPTS 5
#define HEAD_MAX 16384
#define READ_SIZE 65536
#define MAX_ERRORS 10

enum phase { WAITING, CONNECTING, HEAD, BODY, CLOSED };
enum chunk_state { SIZE_LINE, EXTENSION, SIZE_LF, DATA, DATA_CR, DATA_LF, LAST };

struct stream {
    int fd;
    enum phase phase;
    int attempts;
    double retry_at;
    const char *request;
    size_t request_len, sent;
    char head[HEAD_MAX];
    size_t head_len;
    int chunked;
    enum chunk_state chunk;
    size_t chunk_size, chunk_left;
    char *frames; /* body bytes not yet split into frames */
    size_t len, cap;
    long next_seq, received, gaps;
    int connected, finished, closed;
};

static struct stream *streams;
static long stream_count, expected, done_streams, connected_streams, opening, next_to_open;
static int concurrency, keep_latencies, epoll_fd;
static struct sockaddr_in address;
static double *latencies;
static size_t latency_count, latency_cap;
static double first_sent = INFINITY, last_received;
static char errors[MAX_ERRORS][160];
static int error_count;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static double cpu_seconds(void) {
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    return (double)usage.ru_utime.tv_sec + (double)usage.ru_utime.tv_usec / 1e6 + (double)usage.ru_stime.tv_sec +
           (double)usage.ru_stime.tv_usec / 1e6;
}

/* A string as a JSON string's contents: what needs escaping becomes '?' (the errors are for people). */
static void print_json_text(const char *text) {
    for (const char *c = text; *c; c++) putchar(*c == '"' || *c == '\\' || (unsigned char)*c < 0x20 ? '?' : *c);
}

static void note_error(const char *format, ...) {
    if (error_count == MAX_ERRORS) return;
    va_list args;
    va_start(args, format);
    vsnprintf(errors[error_count++], sizeof errors[0], format, args);
    va_end(args);
}

static void fail(const char *format, ...) {
    char reason[256];
    va_list args;
    va_start(args, format);
    vsnprintf(reason, sizeof reason, format, args);
    va_end(args);
    printf("{\"state\": \"failed\", \"error\": \"");
    print_json_text(reason);
    printf("\"}\n");
    fflush(stdout);
    exit(1);
}

static void *grow(void *block, size_t *cap, size_t need, size_t item) {
    if (need <= *cap) return block;
    size_t wanted = *cap ? *cap : 1024;
    while (wanted < need) wanted *= 2;
    void *bigger = realloc(block, wanted * item);
    if (!bigger) fail("out of memory");
    *cap = wanted;
    return bigger;
}

static void drop_connection(struct stream *s) {
    if (s->fd >= 0) {
        epoll_ctl(epoll_fd, EPOLL_CTL_DEL, s->fd, NULL);
        close(s->fd);
        s->fd = -1;
    }
}

static void start_connect(struct stream *s) {
    s->phase = CONNECTING;
    s->sent = s->head_len = s->len = 0;
    s->chunk = SIZE_LINE;
    s->chunk_size = s->chunk_left = 0;
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s->fd < 0) fail("socket: %s", strerror(errno));
    int one = 1;
    setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(s->fd, (struct sockaddr *)&address, sizeof address) < 0 && errno != EINPROGRESS)
        fail("connect: %s", strerror(errno));
    struct epoll_event event = {.events = EPOLLOUT | EPOLLIN, .data.ptr = s};
    if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, s->fd, &event) < 0) fail("epoll_ctl: %s", strerror(errno));
}

static void open_more(void) {
    while (opening < concurrency && next_to_open < stream_count) {
        struct stream *s = &streams[next_to_open++];
        opening++;
        s->attempts = 1;
        start_connect(s);
    }
}

/* The stream failed before its connected frame: try again a little later, as client.py does, up to five times. */
static void retry(struct stream *s, const char *reason) {
    drop_connection(s);
    if (s->attempts >= MAX_ATTEMPTS) fail("stream %ld: %s", (long)(s - streams), reason);
    s->phase = WAITING;
    s->retry_at = now() + 0.2 * s->attempts;
    s->attempts++;
}

static void on_event(struct stream *s, const char *frame, size_t length, double at) {
    const char *mark = memchr(frame, '@', length);
    if (!mark) {
        if (length >= 16 && memmem(frame, length, "event: connected", 16) && !s->connected) {
            s->connected = 1;
            connected_streams++;
            opening--;
            open_more();
        }
        return; /* a comment (a ping) or another frame without a payload */
    }
    char *end;
    long seq = strtol(mark + 1, &end, 10);
    double sent = strtod(end + 1, NULL);
    latencies = grow(latencies, &latency_cap, latency_count + 1, sizeof *latencies);
    latencies[latency_count++] = at - sent;
    if (sent < first_sent) first_sent = sent;
    if (seq != s->next_seq) s->gaps++;
    s->next_seq = seq + 1;
    s->received++;
}

/* Split what the body holds into frames (each ends in a blank line, LF or CRLF) and count their events. */
static void take_frames(struct stream *s, double at) {
    size_t start = 0, position = 0;
    int any = 0;
    while (position < s->len) {
        char *lf = memchr(s->frames + position, '\n', s->len - position);
        if (!lf) break;
        size_t i = (size_t)(lf - s->frames);
        size_t after;
        if (i + 1 < s->len && s->frames[i + 1] == '\n') {
            after = i + 2;
        } else if (i + 2 < s->len && s->frames[i + 1] == '\r' && s->frames[i + 2] == '\n') {
            after = i + 3;
        } else if (i + 1 >= s->len || (i + 2 >= s->len && s->frames[i + 1] == '\r')) {
            break; /* the blank line may be in the next read */
        } else {
            position = i + 1;
            continue;
        }
        on_event(s, s->frames + start, i - start, at);
        any = 1;
        start = position = after;
    }
    if (start) {
        memmove(s->frames, s->frames + start, s->len - start);
        s->len -= start;
    }
    if (any) {
        last_received = at;
        if (expected && !s->finished && s->received >= expected) {
            s->finished = 1;
            done_streams++;
        }
    }
}

static void add_body(struct stream *s, const char *data, size_t length) {
    s->frames = grow(s->frames, &s->cap, s->len + length, 1);
    memcpy(s->frames + s->len, data, length);
    s->len += length;
}

/* A chunked body's data, taken out of its framing; chunks and their size lines may be cut anywhere. */
static void dechunk(struct stream *s, const char *data, size_t length) {
    size_t i = 0;
    while (i < length) {
        char c = data[i];
        switch (s->chunk) {
        case SIZE_LINE:
            if (c == '\r') {
                s->chunk = SIZE_LF;
            } else if (c == ';') {
                s->chunk = EXTENSION;
            } else {
                int digit = c >= '0' && c <= '9' ? c - '0' : (c | 0x20) >= 'a' && (c | 0x20) <= 'f' ? (c | 0x20) - 'a' + 10 : -1;
                if (digit < 0) {
                    note_error("stream %ld: a bad chunk size", (long)(s - streams));
                    s->chunk = LAST;
                    return;
                }
                s->chunk_size = s->chunk_size * 16 + (size_t)digit;
            }
            i++;
            break;
        case EXTENSION:
            if (c == '\r') s->chunk = SIZE_LF;
            i++;
            break;
        case SIZE_LF:
            i++;
            if (s->chunk_size == 0) {
                s->chunk = LAST;
                return;
            }
            s->chunk_left = s->chunk_size;
            s->chunk_size = 0;
            s->chunk = DATA;
            break;
        case DATA: {
            size_t take = length - i < s->chunk_left ? length - i : s->chunk_left;
            add_body(s, data + i, take);
            i += take;
            s->chunk_left -= take;
            if (!s->chunk_left) s->chunk = DATA_CR;
            break;
        }
        case DATA_CR:
            s->chunk = DATA_LF;
            i++;
            break;
        case DATA_LF:
            s->chunk = SIZE_LINE;
            i++;
            break;
        case LAST:
            return;
        }
    }
}

static void on_body(struct stream *s, const char *data, size_t length, double at) {
    if (s->chunked) {
        dechunk(s, data, length);
    } else {
        add_body(s, data, length);
    }
    take_frames(s, at);
}

static void on_head(struct stream *s, const char *data, size_t length, double at) {
    size_t room = HEAD_MAX - 1 - s->head_len;
    size_t take = length < room ? length : room;
    memcpy(s->head + s->head_len, data, take);
    size_t before = s->head_len;
    s->head_len += take;
    s->head[s->head_len] = 0;
    char *end = strstr(s->head, "\r\n\r\n");
    if (!end) {
        if (s->head_len == HEAD_MAX - 1) retry(s, "a response head too long");
        return;
    }
    *end = 0;
    char *line_end = strstr(s->head, "\r\n");
    if (line_end) *line_end = 0;
    if (!strstr(s->head, " 200")) {
        char reason[200];
        snprintf(reason, sizeof reason, "refused: %.120s", s->head);
        note_error("%s", reason);
        retry(s, reason);
        return;
    }
    if (line_end) *line_end = '\r';
    s->chunked = strcasestr(s->head, "transfer-encoding: chunked") != NULL;
    s->phase = BODY;
    size_t body_from = (size_t)(end - s->head) + 4 - before; /* where the body starts in this read */
    if (body_from < length) on_body(s, data + body_from, length - body_from, at);
}

static void on_ready(struct stream *s, uint32_t events, char *buffer) {
    if (s->fd < 0) return; /* dropped earlier in this turn */
    if (s->phase == CONNECTING) {
        int error = 0;
        socklen_t size = sizeof error;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &error, &size);
        if (error) {
            retry(s, strerror(error));
            return;
        }
        if (!(events & EPOLLOUT)) return;
        ssize_t n = send(s->fd, s->request + s->sent, s->request_len - s->sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno != EAGAIN) retry(s, strerror(errno));
            return;
        }
        s->sent += (size_t)n;
        if (s->sent == s->request_len) {
            struct epoll_event event = {.events = EPOLLIN, .data.ptr = s};
            epoll_ctl(epoll_fd, EPOLL_CTL_MOD, s->fd, &event);
            s->phase = HEAD;
        }
        return;
    }
    ssize_t n = recv(s->fd, buffer, READ_SIZE, 0);
    double at = now();
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (n <= 0) {
        if (!s->connected) {
            retry(s, n == 0 ? "closed before the connected frame" : strerror(errno));
            return;
        }
        drop_connection(s);
        s->phase = CLOSED;
        s->closed = 1;
        return;
    }
    if (s->phase == HEAD) {
        on_head(s, buffer, (size_t)n, at);
    } else if (s->phase == BODY) {
        on_body(s, buffer, (size_t)n, at);
    }
}

/* One turn of the loop: what is ready, then the streams whose retry is due (while streams still open). */
static void turn(int timeout_ms, char *buffer) {
    struct epoll_event ready[256];
    int count = epoll_wait(epoll_fd, ready, 256, timeout_ms);
    if (count < 0 && errno != EINTR) fail("epoll_wait: %s", strerror(errno));
    for (int i = 0; i < count; i++) on_ready(ready[i].data.ptr, ready[i].events, buffer);
    if (connected_streams < stream_count) {
        double t = now();
        for (long i = 0; i < next_to_open; i++)
            if (streams[i].phase == WAITING && streams[i].retry_at <= t) start_connect(&streams[i]);
    }
}

static char *read_requests(const char *path, long count) {
    FILE *file = fopen(path, "rb");
    if (!file) fail("%s: %s", path, strerror(errno));
    fseek(file, 0, SEEK_END);
    long size = ftell(file);
    rewind(file);
    char *text = malloc((size_t)size + 1);
    if (!text || fread(text, 1, (size_t)size, file) != (size_t)size) fail("%s: cannot read it", path);
    fclose(file);
    unlink(path);
    text[size] = 0;
    char *at = text;
    for (long i = 0; i < count; i++) {
        char *end;
        long length = strtol(at, &end, 10);
        if (end == at || *end != '\n' || length <= 0 || end + 1 + length > text + size) fail("%s: bad request %ld", path, i);
        streams[i].request = end + 1;
        streams[i].request_len = (size_t)length;
        at = end + 1 + length;
    }
    return text;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* As client.py's percentile(): the value at round(fraction * (n - 1)), rounding half to even. */
static double percentile(double fraction) {
    if (!latency_count) return NAN;
    double index = nearbyint(fraction * (double)(latency_count - 1));
    if (index < 0) index = 0;
    if (index > (double)(latency_count - 1)) index = (double)(latency_count - 1);
    return latencies[(size_t)index];
}

static void print_number(const char *name, double value, int digits) {
    if (isnan(value)) {
        printf(", \"%s\": NaN", name);
    } else {
        printf(", \"%s\": %.*f", name, digits, value);
    }
}

int main(int argc, char **argv) {
    if (argc != 10) {
        fprintf(stderr, "usage: %s HOST PORT STREAMS EXPECTED CONNECT_TIMEOUT RUN_TIMEOUT CONCURRENCY KEEP_LATENCIES "
                        "REQUESTS\n", argv[0]);
        return 2;
    }
    address.sin_family = AF_INET;
    address.sin_port = htons((uint16_t)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &address.sin_addr) != 1) fail("not an IPv4 address: %s", argv[1]);
    stream_count = atol(argv[3]);
    expected = atol(argv[4]);
    double connect_timeout = atof(argv[5]), run_timeout = atof(argv[6]);
    concurrency = atoi(argv[7]);
    keep_latencies = atoi(argv[8]);
    if (stream_count <= 0 || expected <= 0 || concurrency <= 0) fail("streams, events and concurrency must be positive");
    streams = calloc((size_t)stream_count, sizeof *streams);
    if (!streams) fail("out of memory");
    for (long i = 0; i < stream_count; i++) streams[i].fd = -1;
    char *requests = read_requests(argv[9], stream_count);
    epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (epoll_fd < 0) fail("epoll_create1: %s", strerror(errno));
    latency_cap = (size_t)stream_count * (size_t)expected;
    latencies = malloc(latency_cap * sizeof *latencies);
    char *buffer = malloc(READ_SIZE);
    if (!latencies || !buffer) fail("out of memory");

    double started = now();
    open_more();
    while (connected_streams < stream_count) {
        if (now() - started > connect_timeout) fail("%ld of %ld streams connected in %.0f s", connected_streams,
                                                    stream_count, connect_timeout);
        turn(20, buffer);
    }
    double measured_from = now();
    printf("{\"state\": \"connected\", \"streams\": %ld, \"seconds\": %.3f}\n", stream_count, measured_from - started);
    fflush(stdout);

    double cpu_before = cpu_seconds();
    int timed_out = 0;
    while (done_streams < stream_count) {
        if (now() - measured_from > run_timeout) {
            timed_out = 1;
            break;
        }
        turn(100, buffer);
    }
    double measured_until = now();
    double cpu_used = cpu_seconds() - cpu_before;
    for (long i = 0; i < stream_count; i++) drop_connection(&streams[i]);

    qsort(latencies, latency_count, sizeof *latencies, by_value);
    double span = latency_count ? last_received - first_sent : 0.0;
    long gaps = 0, short_streams = 0, closed_streams = 0;
    for (long i = 0; i < stream_count; i++) {
        gaps += streams[i].gaps;
        short_streams += streams[i].received < expected;
        closed_streams += streams[i].closed;
    }
    printf("{\"state\": \"done\", \"client\": \"native\", \"streams\": %ld, \"deliveries\": %zu, \"expected\": %ld",
           stream_count, latency_count, stream_count * expected);
    print_number("seconds", span, 4);
    print_number("deliveries_per_second", span > 0 ? (double)latency_count / span : 0.0, 1);
    print_number("p50_ms", percentile(0.50) * 1000, 3);
    print_number("p90_ms", percentile(0.90) * 1000, 3);
    print_number("p99_ms", percentile(0.99) * 1000, 3);
    print_number("max_ms", latency_count ? latencies[latency_count - 1] * 1000 : NAN, 3);
    printf(", \"gaps\": %ld, \"short_streams\": %ld, \"closed_streams\": %ld, \"timed_out\": %s, \"errors\": [", gaps,
           short_streams, closed_streams, timed_out ? "true" : "false");
    for (int i = 0; i < error_count; i++) {
        printf(i ? ", \"" : "\"");
        print_json_text(errors[i]);
        putchar('"');
    }
    printf("]");
    print_number("client_cpu_share", cpu_used / fmax(1e-9, measured_until - measured_from), 3);
    print_number("hold_seconds", measured_until - measured_from, 3);
    if (keep_latencies) {
        printf(", \"latencies\": [");
        for (size_t i = 0; i < latency_count; i++) printf(i ? ", %.9f" : "%.9f", latencies[i]);
        printf("]");
    }
    printf("}\n");
    fflush(stdout);
    free(requests);
    return 0;
}
