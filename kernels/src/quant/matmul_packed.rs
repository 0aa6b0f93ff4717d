//! The matmul driver for packed (row-interleaved) weights: splits the row groups across the rayon
//! pool and has the kernels write `[token][row]` results straight into the output (serial calls
//! and single tokens) or into one contiguous staging block per parallel task, copied out in
//! whole-row runs.

use super::matmul::{compute_rows, w_row_bytes, Acts, KernelPath, MIN_TASK_WORK, SERIAL_WORK};
use super::packed::{self, GROUP};
use super::types::GgmlType;
use rayon::prelude::*;

/// `out[t * rows + r] = x_t · W_r` for a packed `w` (`out` is `[num_tokens, rows]`).
pub(super) fn run_packed(
    w: &super::Matrix,
    acts: &Acts<'_>,
    num_tokens: usize,
    out: &mut [f32],
    path: KernelPath,
) {
    let (ty, rows, cols) = (w.ty(), w.rows(), w.cols());
    let data = w.packed_groups().expect("run_packed needs a packed matrix");
    let gb = packed::group_bytes(ty, cols);
    let groups = data.len() / gb;
    let kernel = |g: &[u8], o: &mut [f32], ld: usize, valid: usize| {
        compute_groups(ty, path, g, cols, acts, num_tokens, o, ld, valid)
    };
    let work = groups * GROUP * cols * num_tokens;
    let threads = rayon::current_num_threads();
    if work <= SERIAL_WORK || threads == 1 {
        return kernel(data, out, rows, rows);
    }
    let by_balance = groups.div_ceil(threads * 4);
    let by_work = MIN_TASK_WORK.div_ceil(GROUP * cols * num_tokens);
    let chunk = by_balance.max(by_work).clamp(1, groups);
    let chunk_rows = chunk * GROUP;
    if num_tokens == 1 {
        // One token: each task's rows are a contiguous run of the output.
        return out
            .par_chunks_mut(chunk_rows)
            .zip(data.par_chunks(chunk * gb))
            .for_each(|(o, g)| kernel(g, o, o.len(), o.len()));
    }
    let tasks = groups.div_ceil(chunk);
    with_scratch(tasks * num_tokens * chunk_rows, |buf| {
        buf.par_chunks_mut(num_tokens * chunk_rows)
            .zip(data.par_chunks(chunk * gb))
            .enumerate()
            .for_each(|(c, (o, g))| {
                kernel(g, o, chunk_rows, (rows - c * chunk_rows).min(chunk_rows))
            });
        for (c, staged) in buf.chunks_exact(num_tokens * chunk_rows).enumerate() {
            let r0 = c * chunk_rows;
            let valid = (rows - r0).min(chunk_rows);
            for (dst, src) in out
                .chunks_exact_mut(rows)
                .zip(staged.chunks_exact(chunk_rows))
            {
                dst[r0..r0 + valid].copy_from_slice(&src[..valid]);
            }
        }
    });
}

/// Runs `f` on a scratch buffer of `len` floats (contents unspecified) that is reused across
/// calls on this thread, so batched products neither allocate nor zero their staging area.
fn with_scratch(len: usize, f: impl FnOnce(&mut [f32])) {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        // Re-entered (a rayon task stolen while this thread waits ran another product).
        Err(_) => f(&mut vec![0f32; len]),
    });
}

/// Whole packed groups (`groups`) against all tokens: `out[t * ld + r]` for the first `valid`
/// rows of the groups (the rest are padding). Uses the packed kernels where the path has one;
/// otherwise each group is unpacked and run through the row kernels.
#[allow(clippy::too_many_arguments)]
fn compute_groups(
    ty: GgmlType,
    path: KernelPath,
    groups: &[u8],
    cols: usize,
    acts: &Acts<'_>,
    num_tokens: usize,
    out: &mut [f32],
    ld: usize,
    valid: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if let (Acts::Q8(a), true) = (acts, path != KernelPath::Scalar) {
        let vnni = path == KernelPath::Vnni;
        if super::dot_packed::groups(ty, vnni, groups, cols, a, num_tokens, out, ld, valid) {
            return;
        }
    }
    let row_bytes = w_row_bytes(ty, cols);
    let mut raw = vec![0u8; GROUP * row_bytes];
    let mut tmp = vec![0f32; GROUP * num_tokens];
    let gb = packed::group_bytes(ty, cols);
    for (g, grp) in groups.chunks_exact(gb).enumerate() {
        packed::unpack_group(ty, cols, grp, GROUP, &mut raw);
        compute_rows(ty, path, &raw, row_bytes, acts, cols, num_tokens, &mut tmp);
        let n = valid.saturating_sub(g * GROUP).min(GROUP);
        for (r, vals) in tmp.chunks_exact(num_tokens).take(n).enumerate() {
            for (t, &v) in vals.iter().enumerate() {
                out[t * ld + g * GROUP + r] = v;
            }
        }
    }
}
