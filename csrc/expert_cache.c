/* expert_cache.c: routed experts read from the GGUF file into a RAM budget of slots.
 *
 * The slots are split evenly between the MoE layers, so that one layer's experts never evict another's: decode
 * walks the layers in a cycle, which makes a cache shared by all layers evict exactly what the next token needs
 * first. Background threads do every read; the computing thread only queues what is missing and waits for it.
 * Demand reads go before prefetches. An expert the current MoE call still has to compute is "wanted" and is never
 * evicted, which is what makes a budget of one slot per layer still finish (one expert at a time); one it has
 * computed already goes only when nothing else can, so that what a call leaves resident does not depend on how
 * fast it computed. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "flashlite.h"
#include "moe.h"

#define IO_ALIGN 4096
#define HUGE_PAGE (2u << 20)
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14; older kernels refuse it, and slots fault in on first read */
#endif

enum slot_state { SLOT_EMPTY, SLOT_LOADING, SLOT_READY, SLOT_FAILED };

struct slot {
    int32_t key;             /* layer * n_expert + expert, or -1 */
    int state;
    int refs;                /* computations reading the slot now */
    int pinned;
    int prefetched;          /* read by a prefetch and not yet demanded */
    int expected;            /* resident and in its layer's latest prediction: that layer's prefetches keep it */
    uint64_t last_use;
    char *mem;
    const char *w[3];        /* the matrices inside mem, past their alignment padding */
};

struct queue {
    int32_t *keys;
    int64_t head, len, cap;
};

struct fl_expert_cache {
    int n_files;
    int *fd;                             /* one per file of a split model */
    int direct;                          /* 1 when every file reads with O_DIRECT */
    int *direct_fd;
    int lfu;
    int n_layer, n_expert;
    struct fl_expert_layer *layers;
    int64_t slot_bytes, n_slots;
    char *map;                           /* the slots' mapping, of map_bytes; arena starts on a 2 MiB boundary */
    size_t map_bytes;
    char *arena;
    struct slot *slots;
    int64_t *layer_first, *layer_count;  /* the slots of each layer */
    int32_t *where;                      /* key -> slot, or -1 */
    int32_t *wanted;                     /* key -> computations of the current call still to use it */
    uint8_t *in_call;                    /* key -> the current call of its layer uses it */
    int64_t *usage;                      /* key -> times demanded */
    struct queue demand, prefetch;
    uint64_t tick;
    pthread_mutex_t mu;
    pthread_cond_t work;                 /* a request was queued, or a slot became evictable */
    pthread_cond_t loaded;               /* a read finished */
    pthread_t *io;
    int n_io, stop;                      /* stop: atomic, also read by the populating thread */
    pthread_t populater;
    int populating;                      /* populater was started */
    struct fl_expert_stats st;
};

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int64_t align_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

/* Room for one matrix: its bytes rounded to whole blocks, plus the block before it that an unaligned file
 * offset drags into the read. */
static int64_t matrix_room(int64_t bytes) { return align_up(bytes, IO_ALIGN) + IO_ALIGN; }

int64_t fl_expert_cache_slot_bytes(int n_layer, const struct fl_expert_layer *layers) {
    if (n_layer <= 0 || !layers) return -1;
    int64_t most = 0;
    for (int l = 0; l < n_layer; l++) {
        int64_t b = 0;
        for (int m = 0; m < 3; m++) {
            if (layers[l].bytes[m] <= 0 || layers[l].offset[m] < 0) return -1;
            b += matrix_room(layers[l].bytes[m]);
        }
        if (b > most) most = b;
    }
    return most;
}

static int queue_push(struct queue *q, int32_t key) {
    if (q->len == q->cap) {
        int64_t cap = q->cap ? 2 * q->cap : 64;
        int32_t *keys = malloc(sizeof(int32_t) * (size_t)cap);
        if (!keys) return FL_ENOMEM;
        for (int64_t i = 0; i < q->len; i++) keys[i] = q->keys[(q->head + i) % q->cap];
        free(q->keys);
        q->keys = keys;
        q->head = 0;
        q->cap = cap;
    }
    q->keys[(q->head + q->len++) % q->cap] = key;
    return FL_OK;
}

static void queue_push_front(struct queue *q, int32_t key) {
    /* Only after a pop, so there is room. */
    q->head = (q->head + q->cap - 1) % q->cap;
    q->keys[q->head] = key;
    q->len++;
}

static int32_t queue_pop(struct queue *q) {
    int32_t key = q->keys[q->head];
    q->head = (q->head + 1) % q->cap;
    q->len--;
    return key;
}

/* The evictable slot of the layer the policy picks, an empty one first; -1 when every slot is pinned, in use,
 * being read or wanted by the running computation. One the running call has computed already comes last: lfu
 * would otherwise often pick it (a new expert has few demands), and whether it could depended on whether the
 * computation had finished with it before the read picked its victim. A prefetch does not evict another
 * prefetch still waiting for its layer's turn. */
static int64_t pick_victim(struct fl_expert_cache *c, int layer, int policy_lfu, int prefetch) {
    int64_t best = -1;
    for (int64_t s = c->layer_first[layer]; s < c->layer_first[layer] + c->layer_count[layer]; s++) {
        struct slot *sl = &c->slots[s];
        if (sl->state == SLOT_EMPTY) return s;
        if (sl->state == SLOT_LOADING || sl->pinned || sl->refs || c->wanted[sl->key]) continue;
        if (prefetch && (sl->prefetched || sl->expected)) continue;
        if (best < 0) { best = s; continue; }
        struct slot *b = &c->slots[best];
        if (c->in_call[sl->key] != c->in_call[b->key]) {
            if (c->in_call[b->key]) best = s;
            continue;
        }
        int older = sl->last_use < b->last_use;
        if (policy_lfu) {
            int64_t us = c->usage[sl->key], ub = c->usage[b->key];
            if (us < ub || (us == ub && older)) best = s;
        } else if (older) {
            best = s;
        }
    }
    return best;
}

static int read_matrix(struct fl_expert_cache *c, int file, char *room, int64_t offset, int64_t bytes,
                       const char **data, int64_t *read_bytes) {
    int fd = c->fd[file];
    int64_t start = offset / IO_ALIGN * IO_ALIGN;
    int64_t end = align_up(offset + bytes, IO_ALIGN);
    int64_t done = 0, want = end - start;
    while (done < offset + bytes - start) {
        ssize_t r = pread(fd, room + done, (size_t)(want - done), start + done);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return FL_EIO;
        done += r;
    }
    if (!c->direct_fd[file]) posix_fadvise(fd, start, end - start, POSIX_FADV_DONTNEED);
    *data = room + (offset - start);
    *read_bytes += done;
    return FL_OK;
}

/* Read key into slot s (whose state is LOADING) without the lock held. */
static int load_slot(struct fl_expert_cache *c, int64_t s, int32_t key, int64_t *read_bytes) {
    const struct fl_expert_layer *L = &c->layers[key / c->n_expert];
    int64_t e = key % c->n_expert;
    char *room = c->slots[s].mem;
    for (int m = 0; m < 3; m++) {
        int status = read_matrix(c, L->file[m], room, L->offset[m] + e * L->bytes[m], L->bytes[m],
                                 &c->slots[s].w[m], read_bytes);
        if (status != FL_OK) return status;
        room += matrix_room(L->bytes[m]);
    }
    return FL_OK;
}

/* Claim a slot for key and read it; the lock is held on entry and on return. Returns 0 when done or already
 * present, 1 when no slot could be freed (the caller decides whether to wait or drop), or an error. */
static int fetch_locked(struct fl_expert_cache *c, int32_t key, int prefetch) {
    if (c->where[key] >= 0) return 0;
    int64_t s = pick_victim(c, key / c->n_expert, c->lfu, prefetch);
    if (s < 0) return 1;
    struct slot *sl = &c->slots[s];
    if (sl->key >= 0) c->where[sl->key] = -1;
    sl->key = key;
    sl->state = SLOT_LOADING;
    sl->prefetched = prefetch;
    sl->expected = 0;
    sl->last_use = ++c->tick;
    c->where[key] = (int32_t)s;
    pthread_mutex_unlock(&c->mu);
    int64_t bytes = 0;
    double t0 = now_seconds();
    int status = load_slot(c, s, key, &bytes);
    double dt = now_seconds() - t0;
    pthread_mutex_lock(&c->mu);
    c->st.io_seconds += dt;
    c->st.bytes_read += bytes;
    if (prefetch) c->st.prefetches++;
    sl->state = status == FL_OK ? SLOT_READY : SLOT_FAILED;
    pthread_cond_broadcast(&c->loaded);
    return status == FL_OK ? 0 : status;
}

static void *io_main(void *arg) {
    struct fl_expert_cache *c = arg;
    pthread_mutex_lock(&c->mu);
    while (!c->stop) {
        if (c->demand.len) {
            int32_t key = queue_pop(&c->demand);
            if (fetch_locked(c, key, 0) == 1) {
                /* Every slot of the layer is wanted or in use: the computation frees one when it is done. */
                queue_push_front(&c->demand, key);
                pthread_cond_wait(&c->work, &c->mu);
            }
        } else if (c->prefetch.len) {
            if (fetch_locked(c, queue_pop(&c->prefetch), 1) == 1) c->st.prefetch_dropped++;
        } else {
            pthread_cond_wait(&c->work, &c->mu);
        }
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

/* Faults the slots in, 2 MiB at a time, in the order empty slots are taken (the first of every layer, then the
 * second...). A first read into a fresh slot otherwise waits for the page faults as well as for the disk: on a
 * virtual machine, huge pages the host has not backed yet fault in at about 0.5 GB/s, 27 ms for one expert,
 * more than its read. The CPU spent is what the first reads would spend faulting; it runs at normal priority,
 * because a starved idle-priority thread would hold the address space's lock mid-fault and stall every thread
 * that maps memory. A read that gets to a slot first faults it in itself, as before. Populating never writes,
 * so it cannot disturb a slot a read has filled. */
static void *populate_main(void *arg) {
    struct fl_expert_cache *c = arg;
    int64_t most = 0;
    for (int l = 0; l < c->n_layer; l++) most = c->layer_count[l] > most ? c->layer_count[l] : most;
    for (int64_t j = 0; j < most; j++)
        for (int l = 0; l < c->n_layer; l++) {
            if (j >= c->layer_count[l]) continue;
            char *mem = c->slots[c->layer_first[l] + j].mem;
            for (int64_t b = 0; b < c->slot_bytes; b += HUGE_PAGE) {
                if (__atomic_load_n(&c->stop, __ATOMIC_RELAXED)) return NULL;
                size_t len = (size_t)(c->slot_bytes - b < HUGE_PAGE ? c->slot_bytes - b : HUGE_PAGE);
                if (madvise(mem + b, len, MADV_POPULATE_WRITE) != 0) return NULL; /* before Linux 5.14 */
                pthread_mutex_lock(&c->mu);
                c->st.populated_bytes += (int64_t)len;
                pthread_mutex_unlock(&c->mu);
            }
        }
    return NULL;
}

/* The file opened with O_DIRECT when a first aligned read works that way (some file systems refuse it at open,
 * others only at the read), else buffered. */
static int open_for_reads(const char *path, int try_direct, int *direct) {
    int fd = try_direct ? open(path, O_RDONLY | O_DIRECT | O_CLOEXEC) : -1;
    if (fd >= 0) {
        void *probe = NULL;
        int ok = posix_memalign(&probe, IO_ALIGN, IO_ALIGN) == 0 && pread(fd, probe, IO_ALIGN, 0) >= 0;
        free(probe);
        if (ok) {
            *direct = 1;
            return fd;
        }
        close(fd);
    }
    *direct = 0;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    /* Read-ahead would fill the page cache past each read, where the drop after the read does not reach. */
    if (fd >= 0) posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM);
    return fd;
}

static void cache_free(struct fl_expert_cache *c) {
    if (c->map) munmap(c->map, c->map_bytes);
    for (int i = 0; c->fd && i < c->n_files; i++)
        if (c->fd[i] >= 0) close(c->fd[i]);
    free(c->fd);
    free(c->direct_fd);
    free(c->layers);
    free(c->slots);
    free(c->layer_first);
    free(c->layer_count);
    free(c->where);
    free(c->wanted);
    free(c->in_call);
    free(c->usage);
    free(c->demand.keys);
    free(c->prefetch.keys);
    free(c->io);
    free(c);
}

int fl_expert_cache_open(const char *const *paths, int n_files, int n_layer, int n_expert,
                         const struct fl_expert_layer *layers, int64_t budget_bytes, int policy, int io_threads,
                         int direct_io, fl_expert_cache **out) {
    if (!paths || n_files <= 0 || !out || n_layer <= 0 || n_expert <= 0 || io_threads < 1 || io_threads > 64)
        return FL_EINVAL;
    if (policy != FL_EXPERT_LRU && policy != FL_EXPERT_LFU) return FL_EINVAL;
    int64_t slot_bytes = fl_expert_cache_slot_bytes(n_layer, layers);
    if (slot_bytes <= 0 || budget_bytes / slot_bytes < n_layer) return FL_EINVAL;
    struct fl_expert_cache *c = calloc(1, sizeof(*c));
    if (!c) return FL_ENOMEM;
    c->lfu = policy == FL_EXPERT_LFU;
    c->fd = malloc(sizeof(int) * (size_t)n_files);
    c->direct_fd = calloc((size_t)n_files, sizeof(int));
    int64_t *size = calloc((size_t)n_files, sizeof(int64_t));
    if (!c->fd || !c->direct_fd || !size) {
        free(size);
        cache_free(c);
        return FL_ENOMEM;
    }
    c->direct = 1;
    int status = FL_OK;
    for (c->n_files = 0; c->n_files < n_files; c->n_files++) {
        int i = c->n_files;
        struct stat sb;
        c->fd[i] = paths[i] ? open_for_reads(paths[i], direct_io, &c->direct_fd[i]) : -1;
        c->direct &= c->direct_fd[i];
        if (c->fd[i] < 0 || fstat(c->fd[i], &sb) != 0) {
            c->n_files++;
            status = FL_EIO;
            break;
        }
        size[i] = sb.st_size;
    }
    for (int l = 0; l < n_layer && status == FL_OK; l++)
        for (int m = 0; m < 3; m++)
            if (layers[l].file[m] < 0 || layers[l].file[m] >= n_files ||
                layers[l].offset[m] + n_expert * layers[l].bytes[m] > size[layers[l].file[m]] ||
                fl_type_block_bytes(layers[l].type[m]) == 0)
                status = FL_EINVAL;
    free(size);
    if (status != FL_OK) {
        cache_free(c);
        return status;
    }
    c->n_layer = n_layer;
    c->n_expert = n_expert;
    c->slot_bytes = slot_bytes;
    c->n_slots = budget_bytes / slot_bytes;
    if (c->n_slots > (int64_t)n_layer * n_expert) c->n_slots = (int64_t)n_layer * n_expert;
    int64_t keys = (int64_t)n_layer * n_expert;
    c->layers = malloc(sizeof(*layers) * (size_t)n_layer);
    c->slots = calloc((size_t)c->n_slots, sizeof(struct slot));
    c->layer_first = calloc((size_t)n_layer, sizeof(int64_t));
    c->layer_count = calloc((size_t)n_layer, sizeof(int64_t));
    c->where = malloc(sizeof(int32_t) * (size_t)keys);
    c->wanted = calloc((size_t)keys, sizeof(int32_t));
    c->in_call = calloc((size_t)keys, 1);
    c->usage = calloc((size_t)keys, sizeof(int64_t));
    c->io = calloc((size_t)io_threads, sizeof(pthread_t));
    c->map_bytes = (size_t)(c->n_slots * slot_bytes) + HUGE_PAGE;
    c->map = mmap(NULL, c->map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (c->map == MAP_FAILED) {
        c->map = NULL;
    } else {
        /* Huge pages: the dots stream experts 21% faster than from 4 KiB pages (fewer page walks). */
        c->arena = c->map + (HUGE_PAGE - (uintptr_t)c->map % HUGE_PAGE) % HUGE_PAGE;
        madvise(c->arena, (size_t)(c->n_slots * slot_bytes), MADV_HUGEPAGE);
    }
    if (!c->layers || !c->slots || !c->layer_first || !c->layer_count || !c->where || !c->wanted || !c->in_call ||
        !c->usage || !c->io || !c->arena) {
        cache_free(c);
        return FL_ENOMEM;
    }
    memcpy(c->layers, layers, sizeof(*layers) * (size_t)n_layer);
    for (int64_t k = 0; k < keys; k++) c->where[k] = -1;
    for (int l = 0, s = 0; l < n_layer; l++) {
        int64_t share = c->n_slots / n_layer + (l < c->n_slots % n_layer);
        if (share > n_expert) share = n_expert;
        c->layer_first[l] = s;
        c->layer_count[l] = share;
        s += (int)share;
    }
    for (int64_t s = 0; s < c->n_slots; s++) {
        c->slots[s].key = -1;
        c->slots[s].mem = c->arena + s * slot_bytes;
    }
    c->st.slots = c->n_slots;
    c->st.slot_bytes = slot_bytes;
    c->st.direct_io = c->direct;
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->work, NULL);
    pthread_cond_init(&c->loaded, NULL);
    for (c->n_io = 0; c->n_io < io_threads; c->n_io++)
        if (pthread_create(&c->io[c->n_io], NULL, io_main, c) != 0) {
            fl_expert_cache_close(c);
            return FL_ENOMEM;
        }
    c->populating = pthread_create(&c->populater, NULL, populate_main, c) == 0;
    *out = c;
    return FL_OK;
}

void fl_expert_cache_close(fl_expert_cache *c) {
    if (!c) return;
    pthread_mutex_lock(&c->mu);
    __atomic_store_n(&c->stop, 1, __ATOMIC_RELAXED);
    pthread_cond_broadcast(&c->work);
    pthread_mutex_unlock(&c->mu);
    for (int i = 0; i < c->n_io; i++) pthread_join(c->io[i], NULL);
    if (c->populating) pthread_join(c->populater, NULL);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->work);
    pthread_cond_destroy(&c->loaded);
    cache_free(c);
}

/* ---------------------------------------------------------------- requests from the computing thread */

static int valid_experts(const struct fl_expert_cache *c, int layer, const int32_t *experts, int n) {
    if (!c || layer < 0 || layer >= c->n_layer || n < 0 || (n && !experts)) return 0;
    for (int i = 0; i < n; i++)
        if (experts[i] < 0 || experts[i] >= c->n_expert) return 0;
    return 1;
}

int fl_expert_cache_pin(fl_expert_cache *c, int layer, const int32_t *experts, int n) {
    if (!valid_experts(c, layer, experts, n)) return FL_EINVAL;
    pthread_mutex_lock(&c->mu);
    int64_t pinned = 0;
    for (int64_t s = c->layer_first[layer]; s < c->layer_first[layer] + c->layer_count[layer]; s++)
        pinned += c->slots[s].pinned;
    int status = FL_OK;
    for (int i = 0; i < n && status == FL_OK; i++) {
        int32_t key = layer * c->n_expert + experts[i];
        if (c->where[key] >= 0 && c->slots[c->where[key]].pinned) continue;
        if (pinned + 1 >= c->layer_count[layer]) {
            status = FL_EINVAL;
            break;
        }
        /* Read on this thread: pinning happens at load, before any computation wants a slot. */
        c->wanted[key]++;
        while (c->where[key] >= 0 && c->slots[c->where[key]].state == SLOT_LOADING)
            pthread_cond_wait(&c->loaded, &c->mu);
        int r = fetch_locked(c, key, 0);
        c->wanted[key]--;
        if (r != 0) {
            status = r == 1 ? FL_EINVAL : r;
            break;
        }
        struct slot *sl = &c->slots[c->where[key]];
        if (sl->state != SLOT_READY) {
            status = FL_EIO;
            break;
        }
        sl->pinned = 1;
        pinned++;
    }
    pthread_mutex_unlock(&c->mu);
    return status;
}

int fl_expert_cache_prefetch(fl_expert_cache *c, int layer, const int32_t *experts, int n) {
    if (!valid_experts(c, layer, experts, n)) return FL_EINVAL;
    int status = FL_OK;
    pthread_mutex_lock(&c->mu);
    /* More prefetches than the layer has slots would only evict each other. */
    int64_t room = c->layer_count[layer];
    for (int i = 0; i < n && i < room && status == FL_OK; i++) {
        int32_t key = layer * c->n_expert + experts[i];
        if (c->where[key] < 0)
            status = queue_push(&c->prefetch, key);
        else
            c->slots[c->where[key]].expected = 1;
    }
    pthread_cond_broadcast(&c->work);
    pthread_mutex_unlock(&c->mu);
    return status;
}

int fl_expert_cache_stats(const fl_expert_cache *c, struct fl_expert_stats *out) {
    if (!c || !out) return FL_EINVAL;
    pthread_mutex_lock((pthread_mutex_t *)&c->mu);
    *out = c->st;
    pthread_mutex_unlock((pthread_mutex_t *)&c->mu);
    return FL_OK;
}

void fl_expert_cache_reset_stats(fl_expert_cache *c) {
    if (!c) return;
    pthread_mutex_lock(&c->mu);
    struct fl_expert_stats keep = c->st;
    memset(&c->st, 0, sizeof(c->st));
    c->st.slots = keep.slots;
    c->st.slot_bytes = keep.slot_bytes;
    c->st.direct_io = keep.direct_io;
    c->st.populated_bytes = keep.populated_bytes;
    pthread_mutex_unlock(&c->mu);
}

int fl_expert_cache_usage(const fl_expert_cache *c, int64_t *counts) {
    if (!c || !counts) return FL_EINVAL;
    pthread_mutex_lock((pthread_mutex_t *)&c->mu);
    memcpy(counts, c->usage, sizeof(int64_t) * (size_t)c->n_layer * (size_t)c->n_expert);
    pthread_mutex_unlock((pthread_mutex_t *)&c->mu);
    return FL_OK;
}

struct cached_layer {
    fl_expert_cache *c;
    int layer;
};

/* Under the lock: take key's slot for a computation when its read is done; 0 when it is not ready. */
static int take_ready(struct fl_expert_cache *c, int32_t key, const void *w[3]) {
    int32_t s = c->where[key];
    if (s < 0 || c->slots[s].state != SLOT_READY) return 0;
    struct slot *sl = &c->slots[s];
    sl->refs++;
    sl->last_use = ++c->tick;
    for (int m = 0; m < 3; m++) w[m] = sl->w[m];
    return 1;
}

static int cached_acquire(void *ctx, int32_t e, const void *w[3]) {
    struct cached_layer *cl = ctx;
    struct fl_expert_cache *c = cl->c;
    int32_t key = cl->layer * c->n_expert + e;
    int status = FL_OK;
    double waited = 0;
    pthread_mutex_lock(&c->mu);
    while (!take_ready(c, key, w)) {
        int32_t s = c->where[key];
        if (s >= 0 && c->slots[s].state == SLOT_FAILED) {
            /* Forget the failed read so that a later call tries again. */
            c->slots[s].state = SLOT_EMPTY;
            c->slots[s].key = -1;
            c->where[key] = -1;
            status = FL_EIO;
            break;
        }
        if (s < 0) {
            /* Evicted since the call queued it, or never queued: ask again, first in line. */
            status = queue_push(&c->demand, key);
            if (status != FL_OK) break;
            pthread_cond_broadcast(&c->work);
        }
        double t0 = now_seconds();
        pthread_cond_wait(&c->loaded, &c->mu);
        waited += now_seconds() - t0;
    }
    c->st.stall_seconds += waited;
    pthread_mutex_unlock(&c->mu);
    return status;
}

static int cached_try_acquire(void *ctx, int32_t e, const void *w[3]) {
    struct cached_layer *cl = ctx;
    struct fl_expert_cache *c = cl->c;
    pthread_mutex_lock(&c->mu);
    int taken = take_ready(c, cl->layer * c->n_expert + e, w);
    pthread_mutex_unlock(&c->mu);
    return taken ? FL_OK : FL_BUSY;
}

static void cached_release(void *ctx, int32_t e) {
    struct cached_layer *cl = ctx;
    struct fl_expert_cache *c = cl->c;
    int32_t key = cl->layer * c->n_expert + e;
    pthread_mutex_lock(&c->mu);
    int32_t s = c->where[key];
    if (s >= 0 && c->slots[s].refs) c->slots[s].refs--;
    if (c->wanted[key]) c->wanted[key]--;
    pthread_cond_broadcast(&c->work);
    pthread_mutex_unlock(&c->mu);
}

/* Under the lock: note what the call needs, count hits and misses, queue the misses in ascending order and drop
 * the layer's queued prefetches (the router has now spoken). order gets the resident experts first. */
static int plan_call(struct fl_expert_cache *c, int layer, const uint8_t *used, int32_t *order, int64_t *n_order) {
    int64_t n = 0;
    int status = FL_OK;
    int32_t base = layer * c->n_expert;
    for (int64_t i = c->prefetch.len, k = 0; k < i; k++) {
        int32_t key = queue_pop(&c->prefetch);
        if (key / c->n_expert == layer && c->where[key] < 0) {
            c->st.prefetch_dropped++;
            continue;
        }
        queue_push(&c->prefetch, key);
    }
    for (int pass = 0; pass < 2; pass++)
        for (int32_t e = 0; e < c->n_expert; e++) {
            if (!used[e]) continue;
            int32_t key = base + e;
            int32_t s = c->where[key];
            if ((s >= 0) != (pass == 0)) continue;
            order[n++] = e;
            c->wanted[key]++;
            c->in_call[key] = 1;
            c->usage[key]++;
            if (s >= 0) {
                c->st.hits++;
                if (c->slots[s].prefetched) {
                    c->st.prefetch_hits++;
                    c->slots[s].prefetched = 0;
                }
            } else {
                c->st.misses++;
                if (status == FL_OK) status = queue_push(&c->demand, key);
            }
        }
    for (int64_t s = c->layer_first[layer]; s < c->layer_first[layer] + c->layer_count[layer]; s++)
        c->slots[s].prefetched = c->slots[s].expected = 0;
    pthread_cond_broadcast(&c->work);
    *n_order = n;
    return status;
}

int fl_moe_experts_cached(fl_expert_cache *c, int layer, int64_t n_tok, int64_t dim, int64_t inter, int64_t n_used,
                          const float *x, const int32_t *idx, const float *weights, float limit, float *out) {
    if (!c || layer < 0 || layer >= c->n_layer) return FL_EINVAL;
    int status = moe_check_routes(n_tok, dim, inter, n_used, c->n_expert, x, idx, weights, out);
    if (status != FL_OK) return status;
    const struct fl_expert_layer *L = &c->layers[layer];
    if (L->bytes[0] != fl_row_bytes(L->type[0], dim) * inter || L->bytes[1] != fl_row_bytes(L->type[1], dim) * inter ||
        L->bytes[2] != fl_row_bytes(L->type[2], inter) * dim)
        return FL_EINVAL;
    uint8_t *used = calloc((size_t)c->n_expert, 1);
    int32_t *order = malloc(sizeof(int32_t) * (size_t)c->n_expert);
    if (!used || !order) {
        free(used);
        free(order);
        return FL_ENOMEM;
    }
    for (int64_t i = 0; i < n_tok * n_used; i++) used[idx[i]] = 1;
    int64_t n_order = 0;
    pthread_mutex_lock(&c->mu);
    status = plan_call(c, layer, used, order, &n_order);
    pthread_mutex_unlock(&c->mu);
    struct cached_layer cl = {c, layer};
    struct moe_source src = {{L->type[0], L->type[1], L->type[2]}, &cl, cached_acquire, cached_try_acquire,
                             cached_release};
    if (status == FL_OK)
        status = moe_run(&src, order, n_order, n_tok, dim, inter, n_used, c->n_expert, x, idx, weights, limit, out);
    pthread_mutex_lock(&c->mu);
    for (int32_t e = 0; e < c->n_expert; e++) {
        int32_t key = layer * c->n_expert + e;
        if (!used[e]) continue;
        c->in_call[key] = 0;
        /* moe_run stops at the first failure: release what the call still wanted. */
        if (status != FL_OK && c->wanted[key]) c->wanted[key]--;
    }
    if (status != FL_OK) pthread_cond_broadcast(&c->work);
    pthread_mutex_unlock(&c->mu);
    free(used);
    free(order);
    return status;
}

int64_t fl_file_cached_bytes(const char *path, int64_t offset, int64_t len) {
    if (!path || offset < 0 || len < 0) return -1;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    long page = sysconf(_SC_PAGESIZE);
    int64_t start = offset / page * page, end = offset + len;
    int64_t total = -1;
    if (end > start) {
        void *map = mmap(NULL, (size_t)(end - start), PROT_READ, MAP_SHARED, fd, start);
        size_t pages = (size_t)((end - start + page - 1) / page);
        unsigned char *vec = malloc(pages);
        if (map != MAP_FAILED && vec && mincore(map, (size_t)(end - start), vec) == 0) {
            total = 0;
            for (size_t i = 0; i < pages; i++) total += (vec[i] & 1) ? page : 0;
        }
        free(vec);
        if (map != MAP_FAILED) munmap(map, (size_t)(end - start));
    } else {
        total = 0;
    }
    close(fd);
    return total;
}
