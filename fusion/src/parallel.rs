//! Splitting row-wise work over the machine's cores with scoped threads.

/// Threads to use for host-side tensor work.
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Below this many elements a job runs on the calling thread.
const INLINE_ELEMENTS: usize = 1 << 16;

/// Calls `f(row_index, row)` for every `row_len`-long row of `out`, spread over threads.
pub fn for_each_row<F>(out: &mut [f32], row_len: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    if row_len == 0 || out.is_empty() {
        return;
    }
    let rows = out.len() / row_len;
    let n = threads().min(rows);
    if n <= 1 || out.len() < INLINE_ELEMENTS {
        for (i, row) in out.chunks_mut(row_len).enumerate() {
            f(i, row);
        }
        return;
    }
    let per = rows.div_ceil(n);
    std::thread::scope(|s| {
        for (chunk_index, chunk) in out.chunks_mut(per * row_len).enumerate() {
            let f = &f;
            s.spawn(move || {
                for (i, row) in chunk.chunks_mut(row_len).enumerate() {
                    f(chunk_index * per + i, row);
                }
            });
        }
    });
}

/// Calls `f(first_row, block)` for contiguous blocks of whole `row_len`-long
/// rows of `out`, one block per thread.
pub fn for_each_row_block<F>(out: &mut [f32], row_len: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    if row_len == 0 || out.is_empty() {
        return;
    }
    let rows = out.len() / row_len;
    let n = threads().min(rows);
    if n <= 1 || out.len() < INLINE_ELEMENTS {
        f(0, out);
        return;
    }
    let per = rows.div_ceil(n);
    std::thread::scope(|s| {
        for (index, block) in out.chunks_mut(per * row_len).enumerate() {
            let f = &f;
            s.spawn(move || f(index * per, block));
        }
    });
}

/// Maps contiguous ranges of `0..count` to partial results on several threads
/// and returns them in order (`work` elements per item decide whether to split).
pub fn map_ranges<T, F>(count: usize, work_per_item: usize, f: F) -> Vec<T>
where
    T: Send,
    F: Fn(std::ops::Range<usize>) -> T + Sync,
{
    let n = threads().min(count.max(1));
    if n <= 1 || count.saturating_mul(work_per_item) < INLINE_ELEMENTS {
        return vec![f(0..count)];
    }
    let per = count.div_ceil(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..count)
            .step_by(per)
            .map(|start| {
                let f = &f;
                s.spawn(move || f(start..(start + per).min(count)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    })
}

/// Sum of squares in f64 (the square of an f32 is exact in f64), with
/// several accumulators so the compiler vectorises it. Summing in f32 loses
/// enough precision to flip near-ties in NT's ranking on wide layers.
pub fn sum_squares(xs: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            let x = f64::from(*x);
            *a += x * x;
        }
    }
    let mut total: f64 = acc.iter().sum();
    for x in rest {
        total += f64::from(*x) * f64::from(*x);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_ranges_cover_everything_once() {
        let mut out = vec![0.0f32; 300_000];
        for_each_row(&mut out, 1000, |i, row| {
            row.iter_mut().for_each(|x| *x = i as f32)
        });
        assert!(out
            .chunks(1000)
            .enumerate()
            .all(|(i, r)| r.iter().all(|&x| x == i as f32)));
        let parts = map_ranges(1000, 1000, |r| r.sum::<usize>());
        assert_eq!(parts.iter().sum::<usize>(), 999 * 1000 / 2);
        let xs: Vec<f32> = (0..19).map(|i| i as f32).collect();
        assert_eq!(
            sum_squares(&xs),
            xs.iter().map(|x| f64::from(x * x)).sum::<f64>()
        );
    }
}
