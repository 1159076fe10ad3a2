/* check.h: what the C tests share: a failure count and CHECK, which records a failed condition with its place and
 * a printf-style message and goes on, so one run reports every failure. */
#ifndef FLASHLITE_TEST_CHECK_H
#define FLASHLITE_TEST_CHECK_H
#include <stdio.h>

static int failures;

#define CHECK(cond, ...)                                                                                     \
    do {                                                                                                     \
        if (!(cond)) {                                                                                       \
            failures++;                                                                                      \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                                                      \
            printf(__VA_ARGS__);                                                                             \
            printf("\n");                                                                                    \
        }                                                                                                    \
    } while (0)

#endif
