"""Where the publishing kernel's time goes: CPU cycles per user row, phase by phase.

    python bench/kernel_phases.py [--users 60000] [--services 2000] [--top-n 20]

Compiles a small C driver that includes `rec/native/topn_kernel.c` itself (so it sees the
kernel's static functions, built with the same `-O3 -march=native`), runs the kernel's
phases one after another on one core over random factors, and times each with the CPU's
time-stamp counter:

- dot: the fused dot products and block maxima (`dot_rows`), the part torch's matmul also does;
- threshold: the bound on the n-th best dot product from the block maxima;
- weigh: every service's softmax weight, the tail masses and the columns above the threshold;
- rank: ranking those columns into the n candidates, and the candidates' scores;
- uniforms and select: the counter-based uniforms and the n slots with exploration.

It prints the cycles of each phase and their ratio to the dot products' cycles (what a
`matmul_ratio` of 0.5 allows for everything else is one dot product's worth), then one JSON
line. The counter ticks at the nominal frequency, so the ratios are the figures to compare
across machines. Needs a C compiler (`CC`, default `cc`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

KERNEL = Path(__file__).resolve().parent.parent / "rec" / "native" / "topn_kernel.c"

DRIVER = r"""
#include KERNEL_SOURCE
#include <stdio.h>
#include <x86intrin.h>

static uint64_t state = 88172645463325252ull;
static float uniform_pm1(void) { /* xorshift64: fixed, seeded data */
    state ^= state << 13; state ^= state >> 7; state ^= state << 17;
    return (float)((state >> 11) * 0x1.0p-53) * 2.0f - 1.0f;
}

int main(int argc, char **argv) {
    const int users = atoi(argv[1]), n_items = atoi(argv[2]), n = atoi(argv[3]);
    const double exploration = atof(argv[4]);
    const int dim = 17, width = (n_items + 255) / 256 * 256, blocks = width / BLOCK;
    const float cap = 25.0f, scale = 0.25f;
    float *user = malloc(sizeof(float) * (size_t)users * dim);
    float *items_t = aligned_alloc(64, sizeof(float) * (size_t)dim * width);
    for (long i = 0; i < (long)users * dim; ++i) user[i] = scale * uniform_pm1();
    for (int d = 0; d < dim; ++d)
        for (int j = 0; j < width; ++j)
            items_t[d * width + j] = j < n_items ? scale * uniform_pm1() : 0.0f;

    Row *row = aligned_alloc(64, (sizeof(Row) + 63) / 64 * 64);
    float *x = aligned_alloc(64, sizeof(float) * ROWS * width);
    float *block_max = aligned_alloc(64, sizeof(float) * ROWS * blocks);
    float *panels = aligned_alloc(64, sizeof(float) * dim * width);
    row->w = aligned_alloc(64, sizeof(float) * width);
    row->tail = aligned_alloc(64, sizeof(double) * blocks);
    row->n = n; row->n_items = n_items; row->width = width; row->blocks = blocks;
    transform_init(&row->tf, cap);
    pack_items(items_t, dim, width, panels);
    double norm = 0.0;
    for (int j = 0; j < n_items; ++j) {
        double q = 0.0;
        for (int d = 0; d < dim; ++d) q += (double)items_t[d * width + j] * items_t[d * width + j];
        norm = q > norm ? q : norm;
    }
    row->max_item_norm = sqrt(norm);

    int32_t index[MAX_N]; float score[MAX_N], propensity[MAX_N]; double draws[MAX_N];
    uint64_t dot = 0, threshold = 0, weigh_c = 0, rank = 0, uniforms = 0, select = 0;
    long found_total = 0;
    for (int pass = 0; pass < 2; ++pass) { /* the first warms caches and branch predictors */
        dot = threshold = weigh_c = rank = uniforms = select = 0; found_total = 0;
        for (int start = 0; start + ROWS <= users; start += ROWS) {
            uint64_t t0 = __rdtsc();
            dot_rows(user + (size_t)start * dim, ROWS, dim, panels, width, n_items, x, block_max);
            dot += __rdtsc() - t0;
            for (int r = 0; r < ROWS; ++r) {
                const float *u = user + (size_t)(start + r) * dim;
                double q = 0.0;
                for (int d = 0; d < dim; ++d) q += (double)u[d] * u[d];
                row->x = x + (size_t)r * width; row->block_max = block_max + (size_t)r * blocks;
                row->user_norm = sqrt(q);
                uint64_t t1 = __rdtsc();
                row->terms = series_terms(row);
                vf limit = splat(threshold_of(row));
                uint64_t t2 = __rdtsc();
                int found = weigh_row(row, limit);
                uint64_t t3 = __rdtsc();
                if (found <= FOUND) rank_found(row, found);
                for (int i = 0; i < n; ++i) {
                    row->cand_weight[i] = (double)row->w[row->cand_index[i]];
                    row->w[row->cand_index[i]] = 0.0f;
                    row->cand_score[i] = logit_of(row, row->cand_x[i]);
                }
                uint64_t t4 = __rdtsc();
                for (int slot = 0; slot < n; ++slot)
                    draws[slot] = counter_uniform(2026, (uint64_t)(start + r) * n + slot);
                uint64_t t5 = __rdtsc();
                select_row(row, exploration, draws, index, score, propensity);
                uint64_t t6 = __rdtsc();
                threshold += t2 - t1; weigh_c += t3 - t2; rank += t4 - t3;
                uniforms += t5 - t4; select += t6 - t5; found_total += found;
            }
        }
    }
    const double rows = (double)(users / ROWS * ROWS);
    printf("{\"dot\": %.0f, \"threshold\": %.0f, \"weigh\": %.0f, \"rank\": %.0f, "
           "\"uniforms\": %.0f, \"select\": %.0f, \"found\": %.1f, \"lanes\": %d}\n",
           dot / rows, threshold / rows, weigh_c / rows, rank / rows, uniforms / rows,
           select / rows, found_total / rows, LANES);
    return 0;
}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=60_000)
    parser.add_argument("--services", type=int, default=2000)
    parser.add_argument("--top-n", type=int, default=20)
    parser.add_argument("--exploration", type=float, default=0.1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        source, binary = Path(folder) / "phases.c", Path(folder) / "phases"
        source.write_text(DRIVER.replace("KERNEL_SOURCE", json.dumps(str(KERNEL))))
        subprocess.run([os.environ.get("CC", "cc"), "-O3", "-march=native", "-o", str(binary),
                        str(source), "-lm"], check=True)
        output = subprocess.run([str(binary), str(args.users), str(args.services),
                                 str(args.top_n), str(args.exploration)],
                                check=True, capture_output=True, text=True).stdout
    cycles = json.loads(output)
    phases = ("dot", "threshold", "weigh", "rank", "uniforms", "select")
    total = sum(cycles[p] for p in phases)
    print(f"{args.users:,} users x {args.services:,} services, top {args.top_n}, exploration"
          f" {args.exploration}, {cycles['lanes']}-float vectors, one core")
    for phase in phases:
        share = cycles[phase] / cycles["dot"]
        print(f"  {phase:<10} {cycles[phase]:7.0f} cycles per row   {share:5.2f} x dot")
    print(f"  {'total':<10} {total:7.0f} cycles per row   {total / cycles['dot']:5.2f} x dot"
          f"   (services above the threshold per row: {cycles['found']:.1f})")
    print(f"dot / total {cycles['dot'] / total:.3f}: the matmul_ratio this kernel would reach if"
          " its dot products ran exactly as fast as torch's matmul")
    print(json.dumps({**cycles, "total": round(total),
                      "dot_share": round(cycles["dot"] / total, 3)}))


if __name__ == "__main__":
    main()
