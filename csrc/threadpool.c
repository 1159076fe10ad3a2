/* threadpool.c: a persistent pthread pool running one parallel-for at a time.
 * Workers pull task indices from an atomic counter, so uneven tasks balance themselves, and block on a
 * condition variable between jobs: an idle pool costs no CPU that numpy's BLAS threads might want. */
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>
#include "flashlite.h"
#include "threadpool.h"

#define MAX_THREADS 256

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
static uint64_t generation; /* bumped per job; a worker runs each generation once */
static int busy;            /* workers still inside the current job */
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

static void *worker_main(void *arg) {
    int thread = (int)(intptr_t)arg;
    pthread_mutex_lock(&lock);
    uint64_t seen = start_generation; /* a job submitted before this thread ran must still be seen */
    for (;;) {
        while (generation == seen && !quitting)
            pthread_cond_wait(&wake, &lock);
        if (quitting)
            break;
        seen = generation;
        pthread_mutex_unlock(&lock);
        if (thread < current.threads)
            run_tasks(&current, thread);
        pthread_mutex_lock(&lock);
        if (--busy == 0)
            pthread_cond_signal(&done);
    }
    pthread_mutex_unlock(&lock);
    return NULL;
}

static int online_cpus(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : (int)n;
}

static void stop_workers(void) {
    pthread_mutex_lock(&lock);
    quitting = 1;
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&lock);
    for (int i = 1; i < n_threads; i++)
        pthread_join(workers[i], NULL);
    quitting = 0;
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
    start_generation = generation;
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
    pthread_mutex_lock(&lock);
    current = (struct job){fn, ctx, n_tasks, 0, threads};
    busy = n_threads - 1;
    generation++;
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&lock);

    run_tasks(&current, 0);

    pthread_mutex_lock(&lock);
    while (busy > 0)
        pthread_cond_wait(&done, &lock);
    pthread_mutex_unlock(&lock);
    pthread_mutex_unlock(&submit_lock);
}
