//! The linear assignment problem, solved exactly: Jonker and Volgenant's
//! shortest augmenting path algorithm (LAPJV, 1987) on a dense square cost
//! matrix.
//!
//! OT fusion of two equally wide layers with uniform marginals is an
//! assignment problem: the optimal transport plan is a permutation (a
//! vertex of the Birkhoff polytope) scaled by the marginal. So the plan is
//! found in O(n²) memory and, on the cost matrices of trained layers, far
//! below the O(n³) worst case.
//!
//! The phases are the paper's: column reduction, reduction transfer, two
//! rounds of augmenting row reduction (bounded, so ties can never make it
//! cycle), then a Dijkstra-like augmentation for every row still free.

// The algorithm walks rows and columns of one matrix by index, as published.
#![allow(clippy::needless_range_loop)]

/// The column assigned to each row of the `n × n` row-major `cost`, with
/// the least total cost. Costs must be finite; they are stored in f32 (half
/// the memory of a wide layer's matrix) and the algorithm's prices in f64.
pub fn solve(n: usize, cost: &[f32]) -> Vec<usize> {
    assert_eq!(cost.len(), n * n, "assignment::solve: cost is not n × n");
    if n == 0 {
        return Vec::new();
    }
    let c = |i: usize, j: usize| f64::from(cost[i * n + j]);
    const NONE: usize = usize::MAX;
    let mut row_sol = vec![NONE; n];
    let mut col_sol = vec![NONE; n];
    let mut v = vec![0.0f64; n];

    // Column reduction: every column's cheapest row, last column first.
    let mut matches = vec![0u32; n];
    for j in (0..n).rev() {
        let mut imin = 0;
        let mut min = c(0, j);
        for i in 1..n {
            if c(i, j) < min {
                min = c(i, j);
                imin = i;
            }
        }
        v[j] = min;
        matches[imin] += 1;
        if matches[imin] == 1 {
            row_sol[imin] = j;
            col_sol[j] = imin;
        } else if v[j] < v[row_sol[imin]] {
            let j1 = row_sol[imin];
            row_sol[imin] = j;
            col_sol[j] = imin;
            col_sol[j1] = NONE;
        } else {
            col_sol[j] = NONE;
        }
    }

    // Reduction transfer from rows assigned once; rows assigned none are free.
    let mut free = Vec::with_capacity(n);
    for i in 0..n {
        match matches[i] {
            0 => free.push(i),
            1 => {
                let j1 = row_sol[i];
                let mut min = f64::INFINITY;
                for j in 0..n {
                    if j != j1 {
                        min = min.min(c(i, j) - v[j]);
                    }
                }
                if min.is_finite() {
                    v[j1] -= min;
                }
            }
            _ => {}
        }
    }
    // A row matched to several columns in the reduction keeps only one; the
    // others' columns are unassigned, and every row without a column is free.
    free.retain(|&i| row_sol[i] == NONE);

    // Augmenting row reduction, twice. Each step either settles a row or
    // passes the column on; the step budget keeps ties from cycling.
    for _ in 0..2 {
        let mut k = 0;
        let previous = std::mem::take(&mut free);
        let mut pending = previous;
        let mut budget = 4 * n + 16;
        while k < pending.len() {
            let i = pending[k];
            k += 1;
            if budget == 0 {
                free.push(i);
                continue;
            }
            budget -= 1;
            let mut umin = c(i, 0) - v[0];
            let mut j1 = 0;
            let mut j2 = NONE;
            let mut usubmin = f64::INFINITY;
            for j in 1..n {
                let h = c(i, j) - v[j];
                if h < usubmin {
                    if h >= umin {
                        usubmin = h;
                        j2 = j;
                    } else {
                        usubmin = umin;
                        umin = h;
                        j2 = j1;
                        j1 = j;
                    }
                }
            }
            let mut i0 = col_sol[j1];
            let strictly = umin < usubmin;
            if strictly {
                v[j1] -= usubmin - umin;
            } else if i0 != NONE && j2 != NONE {
                j1 = j2;
                i0 = col_sol[j2];
            }
            if let Some(old) = (row_sol[i] != NONE).then_some(row_sol[i]) {
                col_sol[old] = NONE;
            }
            row_sol[i] = j1;
            col_sol[j1] = i;
            if i0 != NONE {
                row_sol[i0] = NONE;
                if strictly {
                    // Try the displaced row again at once.
                    k -= 1;
                    pending[k] = i0;
                } else {
                    free.push(i0);
                }
            }
        }
    }

    // Augmentation: a shortest path from each free row to a free column.
    let mut d = vec![0.0f64; n];
    let mut pred = vec![0usize; n];
    let mut cols: Vec<usize> = (0..n).collect();
    for &free_row in &free {
        for j in 0..n {
            d[j] = c(free_row, j) - v[j];
            pred[j] = free_row;
            cols[j] = j;
        }
        let mut low = 0;
        let mut up = 0;
        let mut last = 0;
        let mut min = 0.0;
        let end = 'search: loop {
            if up == low {
                last = low;
                min = d[cols[up]];
                up += 1;
                // The scan starts at the first `up`; the swaps below move
                // `up` on within it, as in the published algorithm.
                #[allow(clippy::mut_range_bound)]
                for k in up..n {
                    let j = cols[k];
                    let h = d[j];
                    if h <= min {
                        if h < min {
                            up = low;
                            min = h;
                        }
                        cols[k] = cols[up];
                        cols[up] = j;
                        up += 1;
                    }
                }
                for &j in &cols[low..up] {
                    if col_sol[j] == NONE {
                        break 'search j;
                    }
                }
            }
            let j1 = cols[low];
            low += 1;
            let i = col_sol[j1];
            let h = c(i, j1) - v[j1] - min;
            let mut k = up;
            while k < n {
                let j = cols[k];
                let v2 = c(i, j) - v[j] - h;
                if v2 < d[j] {
                    pred[j] = i;
                    if v2 == min {
                        if col_sol[j] == NONE {
                            break 'search j;
                        }
                        cols[k] = cols[up];
                        cols[up] = j;
                        up += 1;
                    }
                    d[j] = v2;
                }
                k += 1;
            }
        };
        // Columns scanned before the last minimum level get new prices.
        for &j in &cols[..last] {
            v[j] += d[j] - min;
        }
        let mut j = end;
        loop {
            let i = pred[j];
            col_sol[j] = i;
            let next = row_sol[i];
            row_sol[i] = j;
            if i == free_row {
                break;
            }
            j = next;
        }
    }
    row_sol
}

/// The total cost of an assignment.
pub fn total(n: usize, cost: &[f32], assignment: &[usize]) -> f64 {
    assignment
        .iter()
        .enumerate()
        .map(|(i, &j)| f64::from(cost[i * n + j]))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every permutation's cost, the least one.
    fn brute_force(n: usize, cost: &[f32]) -> f64 {
        fn go(n: usize, cost: &[f32], row: usize, used: &mut Vec<bool>, acc: f64, best: &mut f64) {
            if row == n {
                *best = best.min(acc);
                return;
            }
            for j in 0..n {
                if !used[j] {
                    used[j] = true;
                    go(
                        n,
                        cost,
                        row + 1,
                        used,
                        acc + f64::from(cost[row * n + j]),
                        best,
                    );
                    used[j] = false;
                }
            }
        }
        let mut best = f64::INFINITY;
        go(n, cost, 0, &mut vec![false; n], 0.0, &mut best);
        best
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    fn is_permutation(a: &[usize]) -> bool {
        let mut seen = vec![false; a.len()];
        a.iter()
            .all(|&j| j < a.len() && !std::mem::replace(&mut seen[j], true))
    }

    #[test]
    fn agrees_with_brute_force_on_random_matrices_with_and_without_ties() {
        let mut rng = Rng(7);
        for case in 0..3000 {
            let n = 1 + case % 8;
            // Few distinct values make many ties; a wide range makes none.
            let levels = [2u64, 3, 5, 1 << 40][case % 4];
            let cost: Vec<f32> = (0..n * n)
                .map(|_| (rng.next() % levels) as f32 / 7.0)
                .collect();
            let got = solve(n, &cost);
            assert!(is_permutation(&got), "case {case}: {got:?}");
            let best = brute_force(n, &cost);
            let ours = total(n, &cost, &got);
            assert!(
                (ours - best).abs() <= 1e-9 * best.abs().max(1.0),
                "case {case} (n = {n}): {ours} against the optimum {best}\n{cost:?}"
            );
        }
    }

    #[test]
    fn a_permuted_identity_is_recovered_exactly() {
        let n = 300;
        let mut rng = Rng(3);
        let mut perm: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            perm.swap(i, (rng.next() % (i as u64 + 1)) as usize);
        }
        // Zero on the permutation, positive elsewhere.
        let cost: Vec<f32> = (0..n * n)
            .map(|x| {
                let (i, j) = (x / n, x % n);
                if perm[i] == j {
                    0.0
                } else {
                    1.0 + (rng.next() % 100) as f32
                }
            })
            .collect();
        assert_eq!(solve(n, &cost), perm);
    }

    #[test]
    fn constant_and_tiny_matrices() {
        assert!(solve(0, &[]).is_empty());
        assert_eq!(solve(1, &[5.0]), vec![0]);
        let got = solve(50, &vec![1.0; 2500]);
        assert!(is_permutation(&got));
    }
}
