//! A deliberately naive Llama forward pass in f64 over dense weights: no paging, no batching, no
//! quantization, no fusion. Written from the architecture's definition (Hugging Face's
//! `modeling_llama.py`: rotate_half RoPE, GQA by repeating KV heads, RMSNorm, SwiGLU) to check the
//! engine's paged, batched, fused path against.

use std::collections::HashMap;

/// Dense f64 weights keyed by Hugging Face names, plus the hyper-parameters.
pub struct RefModel {
    pub w: HashMap<String, (Vec<usize>, Vec<f64>)>,
    pub hidden: usize,
    pub ffn: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub eps: f64,
    pub theta: f64,
    pub tied: bool,
}

impl RefModel {
    fn get(&self, name: &str) -> &[f64] {
        &self
            .w
            .get(name)
            .unwrap_or_else(|| panic!("missing {name}"))
            .1
    }
    fn opt(&self, name: &str) -> Option<&[f64]> {
        self.w.get(name).map(|(_, v)| v.as_slice())
    }

    /// Logits of every position of `tokens`, `[len][vocab]`.
    pub fn forward(&self, tokens: &[u32]) -> Vec<Vec<f64>> {
        let (h, hd) = (self.hidden, self.head_dim);
        let mut xs: Vec<Vec<f64>> = tokens
            .iter()
            .map(|&t| {
                self.get("model.embed_tokens.weight")[t as usize * h..(t as usize + 1) * h].to_vec()
            })
            .collect();
        for l in 0..self.layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let normed: Vec<Vec<f64>> = xs
                .iter()
                .map(|x| rms(x, self.get(&p("input_layernorm.weight")), self.eps))
                .collect();
            let proj = |name: &str, bias: &str, x: &[f64], rows: usize| {
                let mut y = linear(self.get(&p(name)), x, rows);
                if let Some(b) = self.opt(&p(bias)) {
                    y.iter_mut().zip(b).for_each(|(y, b)| *y += b);
                }
                y
            };
            let mut qs = Vec::new();
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            for (pos, x) in normed.iter().enumerate() {
                let mut q = proj(
                    "self_attn.q_proj.weight",
                    "self_attn.q_proj.bias",
                    x,
                    self.heads * hd,
                );
                let mut k = proj(
                    "self_attn.k_proj.weight",
                    "self_attn.k_proj.bias",
                    x,
                    self.kv_heads * hd,
                );
                rope(&mut q, hd, pos, self.theta);
                rope(&mut k, hd, pos, self.theta);
                qs.push(q);
                ks.push(k);
                vs.push(proj(
                    "self_attn.v_proj.weight",
                    "self_attn.v_proj.bias",
                    x,
                    self.kv_heads * hd,
                ));
            }
            let group = self.heads / self.kv_heads;
            for (i, x) in xs.iter_mut().enumerate() {
                let mut attn = vec![0.0; self.heads * hd];
                for head in 0..self.heads {
                    let kvh = head / group;
                    let q = &qs[i][head * hd..(head + 1) * hd];
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| {
                            q.iter()
                                .zip(&ks[j][kvh * hd..(kvh + 1) * hd])
                                .map(|(a, b)| a * b)
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for (j, w) in e.iter().enumerate() {
                        for d in 0..hd {
                            attn[head * hd + d] += w / z * vs[j][kvh * hd + d];
                        }
                    }
                }
                let o = linear(self.get(&p("self_attn.o_proj.weight")), &attn, h);
                x.iter_mut().zip(o).for_each(|(x, o)| *x += o);
            }
            for x in xs.iter_mut() {
                let n = rms(x, self.get(&p("post_attention_layernorm.weight")), self.eps);
                let g = linear(self.get(&p("mlp.gate_proj.weight")), &n, self.ffn);
                let u = linear(self.get(&p("mlp.up_proj.weight")), &n, self.ffn);
                let a: Vec<f64> = g
                    .iter()
                    .zip(&u)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                let d = linear(self.get(&p("mlp.down_proj.weight")), &a, h);
                x.iter_mut().zip(d).for_each(|(x, d)| *x += d);
            }
        }
        let head = if self.tied {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        xs.iter()
            .map(|x| {
                linear(
                    self.get(head),
                    &rms(x, self.get("model.norm.weight"), self.eps),
                    self.vocab,
                )
            })
            .collect()
    }
}

fn rms(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(x, w)| x * r * w).collect()
}

/// `W x` for W `[rows, x.len()]` row-major.
fn linear(w: &[f64], x: &[f64], rows: usize) -> Vec<f64> {
    (0..rows)
        .map(|r| {
            w[r * x.len()..(r + 1) * x.len()]
                .iter()
                .zip(x)
                .map(|(a, b)| a * b)
                .sum()
        })
        .collect()
}

/// rotate_half RoPE on every head of `v`.
fn rope(v: &mut [f64], hd: usize, pos: usize, theta: f64) {
    let half = hd / 2;
    for head in v.chunks_exact_mut(hd) {
        let orig = head.to_vec();
        for i in 0..half {
            let inv = 1.0 / theta.powf(2.0 * i as f64 / hd as f64);
            let (s, c) = (pos as f64 * inv).sin_cos();
            head[i] = orig[i] * c - orig[i + half] * s;
            head[i + half] = orig[i + half] * c + orig[i] * s;
        }
    }
}
