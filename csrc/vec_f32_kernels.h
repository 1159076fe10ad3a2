/* vec_f32_kernels.h: the body of the blocked f32 kernels of vec_f32.h, written once over a 16-lane vector and
 * included by vec_f32.c once per instruction set. The includer defines V16 with V_ZERO(), V_LOAD(p), V_STORE(p, v),
 * V_ADD(a, b), V_MUL(a, b), V_SET1(x), and KFN(name) to name this level's functions. Lane j of a score's
 * accumulator is lane j of fl_dot_f32's acc, and each output element adds its rows' terms in row order, so
 * every level and every blocking gives bitwise what the plain loops give (the core builds with
 * -ffp-contract=off: no fused multiply-adds). */

/* The lanes of acc added in order, then the tail a[i..n) . b[i..n): the end of fl_dot_f32. */
static inline float KFN(finish)(V16 acc, const float *a, const float *b, int64_t i, int64_t n) {
    float lanes[16];
    V_STORE(lanes, acc);
    float s = 0.0f;
    for (int j = 0; j < 16; j++) s += lanes[j];
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static float KFN(dot)(const float *a, const float *b, int64_t n) {
    V16 acc = V_ZERO();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc = V_ADD(acc, V_MUL(V_LOAD(a + i), V_LOAD(b + i)));
    return KFN(finish)(acc, a, b, i, n);
}

/* Four queries against two rows per pass: eight accumulators, each row and query load used twice or four times. */
static void KFN(scores)(int64_t n_q, const float *q, int64_t n_rows, const float *const *rows, int64_t dim,
                        float scale, float *s) {
    const int64_t body = dim & ~(int64_t)15;
    int64_t h = 0;
    for (; h + 4 <= n_q; h += 4) {
        const float *q0 = q + h * dim, *q1 = q0 + dim, *q2 = q1 + dim, *q3 = q2 + dim;
        float *s0 = s + h * n_rows, *s1 = s0 + n_rows, *s2 = s1 + n_rows, *s3 = s2 + n_rows;
        int64_t i = 0;
        for (; i + 2 <= n_rows; i += 2) {
            const float *r0 = rows[i], *r1 = rows[i + 1];
            V16 a00 = V_ZERO(), a01 = V_ZERO(), a10 = V_ZERO(), a11 = V_ZERO();
            V16 a20 = V_ZERO(), a21 = V_ZERO(), a30 = V_ZERO(), a31 = V_ZERO();
            for (int64_t d = 0; d < body; d += 16) {
                V16 x0 = V_LOAD(r0 + d), x1 = V_LOAD(r1 + d), y;
                y = V_LOAD(q0 + d);
                a00 = V_ADD(a00, V_MUL(y, x0));
                a01 = V_ADD(a01, V_MUL(y, x1));
                y = V_LOAD(q1 + d);
                a10 = V_ADD(a10, V_MUL(y, x0));
                a11 = V_ADD(a11, V_MUL(y, x1));
                y = V_LOAD(q2 + d);
                a20 = V_ADD(a20, V_MUL(y, x0));
                a21 = V_ADD(a21, V_MUL(y, x1));
                y = V_LOAD(q3 + d);
                a30 = V_ADD(a30, V_MUL(y, x0));
                a31 = V_ADD(a31, V_MUL(y, x1));
            }
            s0[i] = KFN(finish)(a00, q0, r0, body, dim) * scale;
            s0[i + 1] = KFN(finish)(a01, q0, r1, body, dim) * scale;
            s1[i] = KFN(finish)(a10, q1, r0, body, dim) * scale;
            s1[i + 1] = KFN(finish)(a11, q1, r1, body, dim) * scale;
            s2[i] = KFN(finish)(a20, q2, r0, body, dim) * scale;
            s2[i + 1] = KFN(finish)(a21, q2, r1, body, dim) * scale;
            s3[i] = KFN(finish)(a30, q3, r0, body, dim) * scale;
            s3[i + 1] = KFN(finish)(a31, q3, r1, body, dim) * scale;
        }
        for (; i < n_rows; i++)
            for (int k = 0; k < 4; k++) s[(h + k) * n_rows + i] = KFN(dot)(q + (h + k) * dim, rows[i], dim) * scale;
    }
    for (; h < n_q; h++)
        for (int64_t i = 0; i < n_rows; i++) s[h * n_rows + i] = KFN(dot)(q + h * dim, rows[i], dim) * scale;
}

/* Four queries' outputs, 16 dims at a time, over all rows: each row load serves four queries. */
static void KFN(mix)(int64_t n_q, const float *w, int64_t n_rows, const float *const *rows, int64_t dim,
                     float *out) {
    const int64_t body = dim & ~(int64_t)15;
    int64_t h = 0;
    for (; h + 4 <= n_q; h += 4) {
        const float *w0 = w + h * n_rows, *w1 = w0 + n_rows, *w2 = w1 + n_rows, *w3 = w2 + n_rows;
        float *o0 = out + h * dim, *o1 = o0 + dim, *o2 = o1 + dim, *o3 = o2 + dim;
        for (int64_t d = 0; d < body; d += 16) {
            V16 a0 = V_ZERO(), a1 = V_ZERO(), a2 = V_ZERO(), a3 = V_ZERO();
            for (int64_t i = 0; i < n_rows; i++) {
                V16 x = V_LOAD(rows[i] + d);
                a0 = V_ADD(a0, V_MUL(V_SET1(w0[i]), x));
                a1 = V_ADD(a1, V_MUL(V_SET1(w1[i]), x));
                a2 = V_ADD(a2, V_MUL(V_SET1(w2[i]), x));
                a3 = V_ADD(a3, V_MUL(V_SET1(w3[i]), x));
            }
            V_STORE(o0 + d, a0);
            V_STORE(o1 + d, a1);
            V_STORE(o2 + d, a2);
            V_STORE(o3 + d, a3);
        }
    }
    for (; h < n_q; h++) {
        const float *wh = w + h * n_rows;
        float *o = out + h * dim;
        for (int64_t d = 0; d < body; d += 16) {
            V16 a = V_ZERO();
            for (int64_t i = 0; i < n_rows; i++) a = V_ADD(a, V_MUL(V_SET1(wh[i]), V_LOAD(rows[i] + d)));
            V_STORE(o + d, a);
        }
    }
    /* the dims past the last 16, one at a time for every query */
    for (h = 0; h < n_q && body < dim; h++)
        for (int64_t d = body; d < dim; d++) {
            float a = 0.0f;
            for (int64_t i = 0; i < n_rows; i++) a += w[h * n_rows + i] * rows[i][d];
            out[h * dim + d] = a;
        }
}

static const struct fl_f32_kernels KFN(kernels) = {KFN(scores), KFN(mix)};
