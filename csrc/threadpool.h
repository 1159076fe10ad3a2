/* threadpool.h: the persistent worker pool of the core (fl_threads_set/get in flashlite.h size it).
 * One parallel-for at a time; the caller works too, and workers sleep on a condition variable when idle. While the
 * workers keep missing jobs (another program has their cores), the caller runs jobs alone for a while. */
#ifndef FLASHLITE_THREADPOOL_H
#define FLASHLITE_THREADPOOL_H
#include <stdint.h>

/* fn(ctx, task, thread) for every task < n_tasks, on at most max_threads threads (<= 0: the whole pool);
 * thread < max_threads names the executing thread, so a caller can hand each one its own scratch sized
 * before the call even if the pool is resized meanwhile. Returns when all tasks are done. One thread (or one task)
 * runs on the caller without waking or judging the workers: a job too small to split costs no more than a loop. */
typedef void (*fl_task_fn)(void *ctx, int64_t task, int thread);
void fl_parallel_for(int64_t n_tasks, int max_threads, fl_task_fn fn, void *ctx);

/* The threads a job submitted now would run on: the pool's, or 1 while its workers keep missing jobs (their
 * cores are taken) and the caller runs jobs alone. Work split for that many threads runs in fewer, larger tasks. */
int fl_pool_width(void);

#endif
