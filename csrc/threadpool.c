/* threadpool.c: a persistent pthread pool running one parallel-for at a time.
 * Workers pull task indices from an atomic counter, so uneven tasks balance themselves. Between jobs a
 * worker spins for SPIN_NS before it blocks on a condition variable, and so does the caller waiting for the
 * last worker: decode issues hundreds of calls per token a few microseconds apart, and a futex wake on each
 * side cost 30-80 us per call on a virtual machine (a 4 MiB expert matrix streams in about 200 us). Past
 * the spin an idle pool costs no CPU that numpy's BLAS threads might want. */
#include <pthread.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include "flashlite.h"
#include "threadpool.h"

#define MAX_THREADS 256
#define SPIN_NS 300000

struct job {
    fl_task_fn fn;
    void *ctx;
    int64_t n_tasks;
    int64_t next; /* atomic: the next task index to hand out */
    int threads;  /* threads at or above this index sit the job out */
};

static pthread_mutex_t submit_lock = PTHREAD_MUTEX_INITIALIZER; /* one job at a time, from any caller thread */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static pthread_cond_t done = PTHREAD_COND_INITIALIZER;
static pthread_t workers[MAX_THREADS];
static int n_threads;       /* 0 until the pool is first sized */
static uint64_t generation; /* atomic: bumped per job; a worker runs each generation once */
static int busy;            /* atomic: workers still inside the current job */
static uint64_t start_generation; /* the generation when the workers were created */
static int quitting;
static struct job current;

static void run_tasks(struct job *job, int thread) {
    for (;;) {
        int64_t task = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (task >= job->n_tasks)
            return;
        job->fn(job->ctx, task, thread);
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

/* Spins until done(arg) or SPIN_NS pass; returns done(arg). */
static int spin_until(int (*done_fn)(const void *), const void *arg) {
    int64_t deadline = 0;
    for (int i = 0;; i++) {
        if (done_fn(arg))
            return 1;
        cpu_relax();
        if ((i & 63) == 63) {
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

static int workers_done(const void *unused) {
    (void)unused;
    return __atomic_load_n(&busy, __ATOMIC_ACQUIRE) == 0;
}

static void *worker_main(void *arg) {
    int thread = (int)(intptr_t)arg;
    uint64_t seen = start_generation; /* a job submitted before this thread ran must still be seen */
    for (;;) {
        if (!spin_until(new_generation, &seen)) {
            pthread_mutex_lock(&lock);
            while (!new_generation(&seen))
                pthread_cond_wait(&wake, &lock);
            pthread_mutex_unlock(&lock);
        }
        if (__atomic_load_n(&quitting, __ATOMIC_ACQUIRE))
            break;
        seen = __atomic_load_n(&generation, __ATOMIC_ACQUIRE);
        if (thread < current.threads)
            run_tasks(&current, thread);
        if (__atomic_sub_fetch(&busy, 1, __ATOMIC_ACQ_REL) == 0) {
            /* under the lock: a caller that found busy > 0 there is already waiting, and gets this */
            pthread_mutex_lock(&lock);
            pthread_cond_signal(&done);
            pthread_mutex_unlock(&lock);
        }
    }
    return NULL;
}

static int online_cpus(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : (int)n;
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
        n = online_cpus();
    if (n > MAX_THREADS)
        return FL_EINVAL;
    if (n == n_threads)
        return FL_OK;
    if (n_threads > 1)
        stop_workers();
    n_threads = 1;
    start_generation = __atomic_load_n(&generation, __ATOMIC_ACQUIRE);
    for (int i = 1; i < n; i++) {
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

void fl_parallel_for(int64_t n_tasks, int max_threads, fl_task_fn fn, void *ctx) {
    if (n_tasks <= 0)
        return;
    pthread_mutex_lock(&submit_lock);
    if (n_threads == 0)
        resize(0);
    int threads = max_threads > 0 && max_threads < n_threads ? max_threads : n_threads;
    if (threads == 1 || n_tasks == 1) {
        for (int64_t t = 0; t < n_tasks; t++)
            fn(ctx, t, 0);
        pthread_mutex_unlock(&submit_lock);
        return;
    }
    current = (struct job){fn, ctx, n_tasks, 0, threads};
    __atomic_store_n(&busy, n_threads - 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&generation, 1, __ATOMIC_RELEASE); /* publishes current and busy to spinning workers */
    pthread_mutex_lock(&lock); /* a worker past its spin checks the generation under this lock, then waits */
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&lock);

    run_tasks(&current, 0);

    if (!spin_until(workers_done, NULL)) {
        pthread_mutex_lock(&lock);
        while (!workers_done(NULL))
            pthread_cond_wait(&done, &lock);
        pthread_mutex_unlock(&lock);
    }
    pthread_mutex_unlock(&submit_lock);
}
