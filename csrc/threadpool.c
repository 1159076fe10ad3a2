/* threadpool.c: a persistent pthread pool running one parallel-for at a time.
 *
 * Threads claim task indices from an atomic ticket, so uneven tasks balance themselves and the caller works too.
 * A job is done when its last task is, not when every worker has checked in: a worker that did not get its core
 * in time (a desktop's UI thread or another program on it) finds the tasks gone when it runs and is not waited
 * for, so the job takes what the threads that did run needed (with two threads sharing one busy core, waiting
 * for the descheduled one cost a scheduler time slice per call: 7x a token). The ticket carries the job's
 * generation next to the index, and each job's description lives in one of two slots, so a late worker holding
 * an old generation can never claim a task of a newer job: its compare-and-swap fails on the tag.
 *
 * Between jobs a thread spins for SPIN_NS before it blocks on a condition variable, and so does the caller
 * waiting for the last task: decode issues hundreds of calls per token a few microseconds apart, and a futex wake
 * on each side cost 30-80 us per call on a virtual machine (a 4 MiB expert matrix streams in about 200 us). The
 * spin yields the core now and then, so that a thread that is runnable on it (ours or another program's) gets it,
 * and past the spin an idle pool costs no CPU.
 *
 * When another program keeps a core busy, a spinning worker still takes its share of the cores, and it runs mostly
 * while the caller, the only one who submits jobs, is the one descheduled: two threads were 10% slower than one
 * though the caller ran 99.9% of the jobs' tasks itself. A spinning worker that has its core sees every job before
 * the next one comes; when one missed LATE_JOBS jobs in a row, the caller runs jobs alone for ALONE_NS (the workers
 * stop spinning and sleep), then tries them again, for twice as long each time they are soon late again.
 * fl_pool_width() says so, so that work is split into fewer, larger tasks meanwhile. */
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include "flashlite.h"
#include "threadpool.h"

#define MAX_THREADS 256
#define SPIN_NS 300000
#define YIELD_EVERY 256 /* spin iterations (about 10 us) between two sched_yield() calls */
#define INDEX_BITS 24   /* the ticket: generation << INDEX_BITS | next task index */
#define MAX_JOB_TASKS ((int64_t)1 << INDEX_BITS)
#define LATE_JOBS 32            /* consecutive jobs a spinning worker missed before the caller runs jobs alone */
#define ALONE_NS 20000000       /* for this long at first */
#define MAX_ALONE_NS 1280000000 /* and at most */

/* A job's description. Fields are read and written with relaxed atomics: a late worker may read a slot while the
 * caller rewrites it for a later job, and then its claim fails on the generation tag before it uses them. */
struct job {
    fl_task_fn fn;
    void *ctx;
    int64_t n_tasks;
    int64_t done; /* tasks finished */
    int threads;  /* threads at or above this index sit the job out */
};

static pthread_mutex_t submit_lock = PTHREAD_MUTEX_INITIALIZER; /* one job at a time, from any caller thread */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static pthread_cond_t finished = PTHREAD_COND_INITIALIZER;
static pthread_t workers[MAX_THREADS];
static int n_threads;             /* 0 until the pool is first sized */
static uint64_t generation;       /* atomic: bumped per job */
static uint64_t ticket;           /* atomic: generation << INDEX_BITS | next task index */
static struct job slots[2];       /* job g is slots[g & 1] */
static uint64_t start_generation; /* the generation when the workers were created */
static int quitting;

/* What the caller learns about a worker: the last generation it saw, and whether it sleeps on `wake` (then its
 * wake-up latency makes it late, which says nothing about its core). Own cache lines: workers write them. */
static struct {
    uint64_t seen;
    int sleeping;
} __attribute__((aligned(64))) worker_state[MAX_THREADS];

/* The previous job, judged when the next one comes (with submit_lock held): whether each worker spun when it was
 * published. */
static uint64_t last_gen; /* 0: nothing to judge */
static int last_threads;
static char last_spinning[MAX_THREADS];
static int late_jobs;       /* consecutive jobs a spinning worker missed */
static int64_t alone_until; /* jobs run on the caller alone until then (now_ns) */
static int64_t alone_ns = ALONE_NS;

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELAXED)

/* Claims the next task of job `gen` into *task; 0 once its tasks are all handed out or a newer job began. */
static int claim(uint64_t gen, int64_t *task) {
    struct job *job = &slots[gen & 1];
    uint64_t t = __atomic_load_n(&ticket, __ATOMIC_ACQUIRE);
    for (;;) {
        int64_t index = (int64_t)(t & (MAX_JOB_TASKS - 1));
        if (t >> INDEX_BITS != (gen & (UINT64_MAX >> INDEX_BITS)) || index >= LOAD(job->n_tasks))
            return 0;
        if (__atomic_compare_exchange_n(&ticket, &t, t + 1, 1, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            *task = index;
            return 1;
        }
    }
}

/* Runs tasks of job `gen` as thread `thread` until none is left; the one that finishes the last wakes the caller. */
static void run_tasks(uint64_t gen, int thread) {
    struct job *job = &slots[gen & 1];
    int64_t task;
    while (claim(gen, &task)) {
        LOAD(job->fn)(LOAD(job->ctx), task, thread); /* the claim pins the slot: the caller waits for this task */
        if (__atomic_add_fetch(&job->done, 1, __ATOMIC_ACQ_REL) == LOAD(job->n_tasks)) {
            /* under the lock: a caller that found the job unfinished there is already waiting, and gets this */
            pthread_mutex_lock(&lock);
            pthread_cond_signal(&finished);
            pthread_mutex_unlock(&lock);
        }
    }
}

static void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Spins until done(arg) or SPIN_NS pass, yielding the core now and then; returns done(arg). */
static int spin_until(int (*done_fn)(const void *), const void *arg) {
    int64_t deadline = 0;
    for (int i = 1;; i++) {
        if (done_fn(arg))
            return 1;
        cpu_relax();
        if (i % YIELD_EVERY == 0) {
            sched_yield();
            int64_t t = now_ns();
            if (deadline == 0)
                deadline = t + SPIN_NS;
            else if (t > deadline)
                return done_fn(arg);
        }
    }
}

static int new_generation(const void *seen) {
    return __atomic_load_n(&generation, __ATOMIC_ACQUIRE) != *(const uint64_t *)seen ||
           __atomic_load_n(&quitting, __ATOMIC_ACQUIRE);
}

static int job_finished(const void *gen) {
    const struct job *job = &slots[*(const uint64_t *)gen & 1];
    return __atomic_load_n(&job->done, __ATOMIC_ACQUIRE) == LOAD(job->n_tasks);
}

static void *worker_main(void *arg) {
    int thread = (int)(intptr_t)arg;
    __atomic_store_n(&worker_state[thread].sleeping, 0, __ATOMIC_RELAXED); /* resize() set it until we ran */
    uint64_t seen = start_generation; /* a job submitted before this thread ran must still be seen */
    for (;;) {
        if (!spin_until(new_generation, &seen)) {
            pthread_mutex_lock(&lock);
            __atomic_store_n(&worker_state[thread].sleeping, 1, __ATOMIC_RELAXED);
            while (!new_generation(&seen))
                pthread_cond_wait(&wake, &lock);
            __atomic_store_n(&worker_state[thread].sleeping, 0, __ATOMIC_RELAXED);
            pthread_mutex_unlock(&lock);
        }
        if (__atomic_load_n(&quitting, __ATOMIC_ACQUIRE))
            break;
        seen = __atomic_load_n(&generation, __ATOMIC_ACQUIRE);
        __atomic_store_n(&worker_state[thread].seen, seen, __ATOMIC_RELEASE);
        if (thread < LOAD(slots[seen & 1].threads))
            run_tasks(seen, thread);
    }
    return NULL;
}

#if defined(__linux__)
/* Reads a sysfs CPU list ("0-3,8,10-11") into set; 0 when the file is absent or unreadable. */
static int read_cpu_list(const char *path, cpu_set_t *set) {
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    char text[4096];
    size_t len = fread(text, 1, sizeof(text) - 1, f);
    fclose(f);
    text[len] = 0;
    CPU_ZERO(set);
    for (char *p = text; *p && *p != '\n';) {
        char *end;
        long lo = strtol(p, &end, 10), hi = lo;
        if (end == p)
            return 0;
        if (*end == '-')
            hi = strtol(end + 1, &end, 10);
        for (long c = lo; c <= hi && c < CPU_SETSIZE; c++)
            CPU_SET((int)c, set);
        p = *end == ',' ? end + 1 : end;
    }
    return 1;
}
#endif

/* The pool's width when the caller does not choose: one thread per physical performance core this process may run
 * on (its affinity mask, which containers and taskset narrow). SMT siblings share a core's execution units and
 * decode is memory-bound, so they add little and take the caller's room; an Intel hybrid CPU's E-cores (outside
 * /sys/devices/cpu_core/cpus) would hold every job back to their pace. These are the cores llama.cpp's default
 * counts; from 8 of them one is left to the caller (a desktop app's UI thread, a server's I/O), whose load would
 * otherwise land on a core the pool spins on. Elsewhere: the online CPUs. */
static int default_threads(void) {
    long n = 0;
#if defined(__linux__)
    cpu_set_t allowed, perf, siblings;
    if (sched_getaffinity(0, sizeof(allowed), &allowed) == 0) {
        int hybrid = read_cpu_list("/sys/devices/cpu_core/cpus", &perf);
        if (hybrid)
            CPU_AND(&perf, &perf, &allowed);
        if (!hybrid || CPU_COUNT(&perf) == 0)
            perf = allowed; /* not a hybrid CPU, or none of its P-cores is ours */
        for (int c = 0; c < CPU_SETSIZE; c++) {
            if (!CPU_ISSET(c, &perf))
                continue;
            char path[96];
            snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu%d/topology/thread_siblings_list", c);
            int first = 1; /* c is the lowest-numbered of its core's CPUs in the set */
            if (read_cpu_list(path, &siblings))
                for (int s = 0; s < c && first; s++)
                    first = !(CPU_ISSET(s, &siblings) && CPU_ISSET(s, &perf));
            n += first;
        }
    }
#endif
    if (n < 1)
        n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n >= 8)
        n -= 1;
    return n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : (int)n;
}

int fl_threads_default(void) {
    return default_threads();
}

static void stop_workers(void) {
    pthread_mutex_lock(&lock);
    __atomic_store_n(&quitting, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&lock);
    for (int i = 1; i < n_threads; i++)
        pthread_join(workers[i], NULL);
    __atomic_store_n(&quitting, 0, __ATOMIC_RELEASE);
    n_threads = 1;
}

/* with submit_lock held */
static int resize(int n) {
    if (n <= 0)
        n = default_threads();
    if (n > MAX_THREADS)
        return FL_EINVAL;
    if (n == n_threads)
        return FL_OK;
    if (n_threads > 1)
        stop_workers();
    n_threads = 1;
    start_generation = __atomic_load_n(&generation, __ATOMIC_ACQUIRE);
    last_gen = 0;
    for (int i = 1; i < n; i++) {
        __atomic_store_n(&worker_state[i].sleeping, 1, __ATOMIC_RELAXED);
        if (pthread_create(&workers[i], NULL, worker_main, (void *)(intptr_t)i) != 0) {
            n_threads = i;
            return FL_ENOMEM;
        }
        n_threads = i + 1;
    }
    return FL_OK;
}

int fl_threads_set(int n) {
    pthread_mutex_lock(&submit_lock);
    int status = resize(n);
    pthread_mutex_unlock(&submit_lock);
    return status;
}

int fl_threads_get(void) {
    pthread_mutex_lock(&submit_lock);
    if (n_threads == 0)
        resize(0);
    int n = n_threads;
    pthread_mutex_unlock(&submit_lock);
    return n;
}

int fl_pool_width(void) {
    pthread_mutex_lock(&submit_lock);
    if (n_threads == 0)
        resize(0);
    int n = n_threads > 1 && alone_until && now_ns() < alone_until ? 1 : n_threads;
    pthread_mutex_unlock(&submit_lock);
    return n;
}

struct offset_job {
    fl_task_fn fn;
    void *ctx;
    int64_t base;
};

static void offset_task(void *ctx, int64_t task, int thread) {
    const struct offset_job *o = ctx;
    o->fn(o->ctx, o->base + task, thread);
}

void fl_parallel_for(int64_t n_tasks, int max_threads, fl_task_fn fn, void *ctx) {
    if (n_tasks <= 0)
        return;
    if (n_tasks >= MAX_JOB_TASKS) { /* more than a ticket counts: in parts */
        for (int64_t base = 0; base < n_tasks; base += MAX_JOB_TASKS - 1) {
            struct offset_job o = {fn, ctx, base};
            int64_t n = n_tasks - base < MAX_JOB_TASKS - 1 ? n_tasks - base : MAX_JOB_TASKS - 1;
            fl_parallel_for(n, max_threads, offset_task, &o);
        }
        return;
    }
    pthread_mutex_lock(&submit_lock);
    if (n_threads == 0)
        resize(0);
    int threads = max_threads > 0 && max_threads < n_threads ? max_threads : n_threads;
    if (threads == 1 || n_tasks == 1) { /* the pool's state untouched: the previous job is judged by the next */
        for (int64_t t = 0; t < n_tasks; t++)
            fn(ctx, t, 0);
        pthread_mutex_unlock(&submit_lock);
        return;
    }
    int64_t now = now_ns();
    if (last_gen) { /* a spinning worker that has its core sees every job before the next one comes */
        int late = 0;
        for (int i = 1; i < last_threads; i++)
            late |= last_spinning[i] && __atomic_load_n(&worker_state[i].seen, __ATOMIC_ACQUIRE) != last_gen;
        late_jobs = late ? late_jobs + 1 : 0;
        if (late_jobs >= LATE_JOBS) { /* twice as long if they were late again within the last period's length */
            alone_ns = now - alone_until < alone_ns ? (alone_ns < MAX_ALONE_NS ? 2 * alone_ns : alone_ns) : ALONE_NS;
            alone_until = now + alone_ns;
            late_jobs = 0;
        }
        last_gen = 0;
    }
    if (now < alone_until) {
        for (int64_t t = 0; t < n_tasks; t++)
            fn(ctx, t, 0);
        pthread_mutex_unlock(&submit_lock);
        return;
    }
    uint64_t gen = __atomic_load_n(&generation, __ATOMIC_RELAXED) + 1;
    struct job *job = &slots[gen & 1]; /* job gen - 2 used it, and finished: only late readers may remain */
    STORE(job->fn, fn);
    STORE(job->ctx, ctx);
    STORE(job->n_tasks, n_tasks);
    STORE(job->threads, threads);
    STORE(job->done, 0);
    __atomic_store_n(&ticket, (gen & (UINT64_MAX >> INDEX_BITS)) << INDEX_BITS, __ATOMIC_RELEASE);
    __atomic_store_n(&generation, gen, __ATOMIC_RELEASE); /* publishes the job to spinning workers */
    pthread_mutex_lock(&lock); /* a worker past its spin checks the generation under this lock, then waits */
    for (int i = 1; i < threads; i++)
        last_spinning[i] = !__atomic_load_n(&worker_state[i].sleeping, __ATOMIC_RELAXED);
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&lock);
    last_gen = gen;
    last_threads = threads;

    run_tasks(gen, 0);

    if (!spin_until(job_finished, &gen)) {
        pthread_mutex_lock(&lock);
        while (!job_finished(&gen))
            pthread_cond_wait(&finished, &lock);
        pthread_mutex_unlock(&lock);
    }
    pthread_mutex_unlock(&submit_lock);
}
