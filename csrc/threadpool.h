/* threadpool.h: the persistent worker pool of the core (fl_threads_set/get in flashlite.h size it).
 * One parallel-for at a time; the caller works too, and workers sleep on a condition variable when idle. */
#ifndef FLASHLITE_THREADPOOL_H
#define FLASHLITE_THREADPOOL_H
#include <stdint.h>

/* fn(ctx, task, thread) for every task < n_tasks, on at most max_threads threads (<= 0: the whole pool);
 * thread < max_threads names the executing thread, so a caller can hand each one its own scratch sized
 * before the call even if the pool is resized meanwhile. Returns when all tasks are done. */
typedef void (*fl_task_fn)(void *ctx, int64_t task, int thread);
void fl_parallel_for(int64_t n_tasks, int max_threads, fl_task_fn fn, void *ctx);

#endif
