//! [`DeviceSampler`]: sampling a step's logits on the device with the kernel of
//! `caduceus_kernels::gpu::sampling`, so only ids, logprobs and a per-row non-finite flag come
//! back. A step's sampling inputs (row descriptors, penalty entries, allowed-token bitsets,
//! `logit_bias` addends) are gathered in one pinned [`HostStaging`] and go up in one queued
//! copy; the outputs sit in one device buffer and come back in one read, the step's only host
//! wait.
//!
//! Runs in the kernels' host emulation in CI, and on a GPU under `scripts/gpu-check`.

use caduceus_kernels::gpu::ops::{self, AddAtEntry};
use caduceus_kernels::gpu::sampling::{
    self, allowed_words, AllowedTokens, LogprobOutputs, SampleArgs, SampleRow,
};
use caduceus_kernels::gpu::{
    as_bytes, BufferView, DType, Device, DeviceBuffer, GpuError, HostStaging,
};
use caduceus_kernels::sampling::{PenaltyEntry, MAX_LOGPROBS};

use crate::engine::{RequestFailure, RowOutcome};
use crate::sampling::{RowSample, SampledToken};

/// Upper bound of the sampling buffers (f32 logits, penalty work, grammar-masked copy and
/// bitsets, row descriptors and outputs) for `rows` rows, which grow on first use.
pub(super) fn sampling_bytes(vocab: usize, rows: usize) -> u64 {
    let per_row = vocab * 4 * 3 + allowed_words(vocab) * 4 + 1024 + 8 * MAX_LOGPROBS;
    (rows * per_row) as u64
}

/// Whether a row is sampled through an allowed-token bitset (a grammar, or banned ids).
fn masked(r: &RowSample) -> bool {
    r.allowed.is_some() || !r.banned.is_empty()
}

const ROW_WORDS: usize = std::mem::size_of::<SampleRow>() / 4;
const ENTRY_WORDS: usize = std::mem::size_of::<PenaltyEntry>() / 4;
// Rows hold an f64: the entries after them start 8-byte aligned.
const _: () = assert!(std::mem::size_of::<SampleRow>().is_multiple_of(8));

const BIAS_WORDS: usize = std::mem::size_of::<AddAtEntry>() / 4;

/// Where one step's inputs lie in the input upload, in words.
#[derive(Clone, Copy, Debug, PartialEq)]
struct InputLayout {
    rows: usize,
    entries: usize,
    num_entries: usize,
    bits: usize,
    bit_words: usize,
    bias: usize,
    num_bias: usize,
    total: usize,
}

impl InputLayout {
    fn new(num_rows: usize, num_entries: usize, bit_words: usize, num_bias: usize) -> InputLayout {
        let entries = num_rows * ROW_WORDS;
        let bits = entries + num_entries * ENTRY_WORDS;
        let bias = bits + bit_words;
        InputLayout {
            rows: 0,
            entries,
            num_entries,
            bits,
            bit_words,
            bias,
            num_bias,
            total: bias + num_bias * BIAS_WORDS,
        }
    }
}

/// Where the outputs lie in the output buffer, in words: ids and non-finite flags first (all a
/// step without logprobs reads back), then logprobs and the top logprobs.
#[derive(Clone, Copy, Debug, PartialEq)]
struct OutputLayout {
    n: usize,
}

impl OutputLayout {
    const IDS: usize = 0;
    fn nonfinite(self) -> usize {
        self.n
    }
    fn logprob(self) -> usize {
        2 * self.n
    }
    fn top_ids(self) -> usize {
        3 * self.n
    }
    fn top_logprobs(self) -> usize {
        (3 + MAX_LOGPROBS) * self.n
    }
    /// Words read back: with logprobs, everything.
    fn read_words(self, logprobs: bool) -> usize {
        match logprobs {
            true => (3 + 2 * MAX_LOGPROBS) * self.n,
            false => 2 * self.n,
        }
    }
}

/// Grow-only device buffers reused across steps.
#[derive(Default)]
struct Scratch {
    bufs: Vec<Option<DeviceBuffer>>,
}

impl Scratch {
    /// Buffer `index`, (re)allocated to hold at least `bytes`.
    fn grow(&mut self, dev: &Device, index: usize, bytes: usize) -> Result<(), GpuError> {
        if self.bufs.len() <= index {
            self.bufs.resize_with(index + 1, || None);
        }
        let slot = &mut self.bufs[index];
        if slot.as_ref().is_none_or(|b| b.len_bytes() < bytes) {
            *slot = Some(dev.alloc_zeroed(bytes.max(4))?);
        }
        Ok(())
    }

    fn get(&self, index: usize) -> Result<&DeviceBuffer, GpuError> {
        self.bufs
            .get(index)
            .and_then(Option::as_ref)
            .ok_or_else(|| GpuError::Shape(format!("sampling buffer {index} missing")))
    }
}

// Indices of the scratch buffers.
const LOGITS_F32: usize = 0;
const INPUTS: usize = 1;
const OUTPUTS: usize = 2;
const WORK: usize = 3;
const MASKED: usize = 4;

/// Device sampling with its reused buffers and pinned input staging.
#[derive(Default)]
pub(super) struct DeviceSampler {
    scratch: Scratch,
    staging: Option<HostStaging>,
}

impl DeviceSampler {
    /// Samples `rows` from the first `rows.len()` rows of `logits` (`[rows, vocab]` in
    /// `dtype`); a row whose logits hold NaN or inf fails alone.
    pub(super) fn sample(
        &mut self,
        dev: &Device,
        dtype: DType,
        logits: &DeviceBuffer,
        vocab: usize,
        rows: &[RowSample],
    ) -> Result<Vec<RowOutcome>, GpuError> {
        let n = rows.len();
        let cells = n * vocab;
        let (descs, entries) = row_descriptors(rows)?;
        let bias = bias_entries(rows, vocab)?;
        let any_masked = rows.iter().any(masked);
        let words = allowed_words(vocab);
        let bit_words = if any_masked { n * words } else { 0 };
        let layout = InputLayout::new(n, entries.len(), bit_words, bias.len());
        let out = OutputLayout { n };
        let want_logprobs = rows.iter().any(|r| r.logprobs.is_some());
        // Every buffer is grown before any is borrowed for the launch.
        for (index, bytes) in [
            (LOGITS_F32, cells * 4),
            (INPUTS, layout.total * 4),
            (OUTPUTS, out.read_words(true) * 4),
            (WORK, if entries.is_empty() { 0 } else { cells * 4 }),
            (MASKED, if any_masked { cells * 4 } else { 0 }),
        ] {
            self.scratch.grow(dev, index, bytes)?;
        }
        let staging = match self.staging.take() {
            Some(s) if s.len() >= layout.total => s,
            // Pinned memory is dear to allocate: grow by doubling.
            _ => dev.host_staging(layout.total.next_power_of_two())?,
        };
        let staging = self.staging.insert(staging);
        let st = staging.bytes_mut()?;
        write_inputs(st, &layout, &descs, &entries, rows, vocab);
        put_words(st, layout.bias, as_bytes(&bias));
        let inputs = self.scratch.get(INPUTS)?;
        dev.upload_staged(inputs, staging, layout.total)?;

        let f32_logits = self.scratch.get(LOGITS_F32)?;
        ops::to_f32(dev, dtype, logits, cells, f32_logits)?;
        // `logit_bias` first, as on the CPU: the kernel draws from and reports the biased rows.
        let bias_buf = view(inputs, layout.bias, layout.num_bias * BIAS_WORDS)?;
        ops::add_at(dev, f32_logits, cells, &bias_buf, bias.len())?;
        let outputs = self.scratch.get(OUTPUTS)?;
        let rows_buf = view(inputs, layout.rows, n * ROW_WORDS)?;
        let penalties = view(inputs, layout.entries, layout.num_entries * ENTRY_WORDS)?;
        let bits = view(inputs, layout.bits, layout.bit_words)?;
        let out_ids = view(outputs, OutputLayout::IDS, n)?;
        let out_nonfinite = view(outputs, out.nonfinite(), n)?;
        let logprob = view(outputs, out.logprob(), n)?;
        let top_ids = view(outputs, out.top_ids(), n * MAX_LOGPROBS)?;
        let top_logprobs = view(outputs, out.top_logprobs(), n * MAX_LOGPROBS)?;
        let args = SampleArgs {
            logits: f32_logits,
            rows: &descs,
            rows_buf: &rows_buf,
            penalties: (!entries.is_empty()).then_some(&*penalties),
            work: (!entries.is_empty())
                .then(|| self.scratch.get(WORK))
                .transpose()?,
            out_ids: &out_ids,
            out_logprobs: want_logprobs.then_some(LogprobOutputs {
                logprob: &logprob,
                top_ids: &top_ids,
                top_logprobs: &top_logprobs,
            }),
            // Bans are written into the bitsets; grammar masks go up as they are.
            allowed: if any_masked {
                Some(AllowedTokens {
                    bits: &bits,
                    masked: self.scratch.get(MASKED)?,
                })
            } else {
                None
            },
            out_nonfinite: Some(&out_nonfinite),
            vocab,
            threads: 0,
        };
        sampling::sample(dev, &args)?;
        let back = view(outputs, 0, out.read_words(want_logprobs))?;
        let back: Vec<u32> = dev.download(&back)?;
        Ok(outcomes(rows, &back, out))
    }
}

/// The kernel's row descriptors and every row's penalty entries, back to back.
fn row_descriptors(rows: &[RowSample]) -> Result<(Vec<SampleRow>, Vec<PenaltyEntry>), GpuError> {
    let mut entries: Vec<PenaltyEntry> = Vec::new();
    let mut descs = Vec::with_capacity(rows.len());
    for r in rows {
        let start = u32::try_from(entries.len())
            .map_err(|_| GpuError::Shape("too many penalty entries".into()))?;
        let count = if r.sampling.penalties.is_active() {
            entries.extend_from_slice(&r.penalties);
            r.penalties.len() as u32
        } else {
            0
        };
        let row = SampleRow::new(&r.sampling, r.u, start, count, r.logprobs);
        descs.push(if masked(r) {
            row.with_allowed_tokens()
        } else {
            row
        });
    }
    Ok((descs, entries))
}

/// Every row's `logit_bias` as addends of the step's `[rows, vocab]` f32 logits (ids past the
/// vocabulary dropped).
fn bias_entries(rows: &[RowSample], vocab: usize) -> Result<Vec<AddAtEntry>, GpuError> {
    let mut out = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        for &(t, value) in r.bias.iter().filter(|&&(t, _)| (t as usize) < vocab) {
            let index = u32::try_from(i * vocab + t as usize)
                .map_err(|_| GpuError::Shape("logits too large for logit_bias indices".into()))?;
            out.push(AddAtEntry { index, value });
        }
    }
    Ok(out)
}

/// Copies `bytes` into the staging `st` at word `at` (only written: pinned staging is
/// write-combined, and reading it is slow).
fn put_words(st: &mut [u8], at: usize, bytes: &[u8]) {
    st[at * 4..at * 4 + bytes.len()].copy_from_slice(bytes);
}

/// Writes the rows, the entries and (for masked rows) the allowed-token bitsets into `st` at
/// `layout` (word offsets). Structured outputs and bans (EOS before min_tokens): one bitset per
/// masked row (the grammar's, as the CPU holds it, less the banned ids), so the kernel still
/// sees the model's own logits when it checks them for NaN and inf. `st` is only written, never
/// read (pinned staging is write-combined: reading it is slow).
fn write_inputs(
    st: &mut [u8],
    layout: &InputLayout,
    descs: &[SampleRow],
    entries: &[PenaltyEntry],
    rows: &[RowSample],
    vocab: usize,
) {
    let mut put = |at: usize, bytes: &[u8]| put_words(st, at, bytes);
    put(layout.rows, as_bytes(descs));
    put(layout.entries, as_bytes(entries));
    if layout.bit_words == 0 {
        return;
    }
    let words = allowed_words(vocab);
    let mut row_bits = vec![0u32; words];
    for (i, r) in rows.iter().enumerate() {
        match &r.allowed {
            Some(mask) => {
                for (d, w) in row_bits
                    .iter_mut()
                    .zip(mask.words().iter().chain(std::iter::repeat(&0)))
                {
                    *d = *w;
                }
            }
            None => row_bits.fill(u32::MAX),
        }
        for t in r.banned.iter().map(|&t| t as usize).filter(|&t| t < vocab) {
            row_bits[t / 32] &= !(1 << (t % 32));
        }
        put(layout.bits + i * words, as_bytes(&row_bits));
    }
}

/// `words` words of `buf` from word `at`.
fn view(buf: &DeviceBuffer, at: usize, words: usize) -> Result<BufferView<'_>, GpuError> {
    buf.view(at * 4, words * 4)
}

/// Each row's token, logprobs or failure from the words read back.
fn outcomes(rows: &[RowSample], back: &[u32], out: OutputLayout) -> Vec<RowOutcome> {
    let f = |at: usize| f32::from_bits(back[at]);
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            if back[out.nonfinite() + i] != 0 {
                // The CPU backend's rule: NaN or inf logits fail this request alone.
                return Err(RequestFailure::NonFiniteLogits);
            }
            Ok(SampledToken {
                token_id: back[OutputLayout::IDS + i],
                logprob: r.logprobs.map(|_| f(out.logprob() + i)),
                top_logprobs: r.logprobs.map_or_else(Vec::new, |k| {
                    let base = i * MAX_LOGPROBS;
                    (0..k.min(MAX_LOGPROBS))
                        .map(|j| {
                            (
                                back[out.top_ids() + base + j],
                                f(out.top_logprobs() + base + j),
                            )
                        })
                        .collect()
                }),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_input_regions_follow_each_other_without_overlap() {
        let l = InputLayout::new(3, 5, 3 * 2, 4);
        assert_eq!(l.rows, 0);
        assert_eq!(l.entries, 3 * 14);
        assert_eq!(l.bits, 3 * 14 + 5 * 2);
        assert_eq!(l.bias, l.bits + 6);
        assert_eq!(l.total, l.bias + 4 * 2);
        // Entries start 8-byte aligned after the rows (their f64 needs it on the device).
        assert_eq!((l.entries * 4) % 8, 0);
    }

    #[test]
    fn the_output_regions_tile_the_buffer() {
        let o = OutputLayout { n: 4 };
        let regions = [
            (OutputLayout::IDS, 4),
            (o.nonfinite(), 4),
            (o.logprob(), 4),
            (o.top_ids(), 4 * MAX_LOGPROBS),
            (o.top_logprobs(), 4 * MAX_LOGPROBS),
        ];
        let mut at = 0;
        for (start, len) in regions {
            assert_eq!(start, at);
            at += len;
        }
        assert_eq!(at, o.read_words(true));
        assert_eq!(o.read_words(false), o.logprob());
    }
}
