//! The decoder (f32 KV cache) against a straightforward reference forward
//! pass written here, on small random models in both pack precisions:
//! logits after every token agree within 1e-4 relative, through blocked
//! prefill, single-token decode and both thread counts; with a LoRA adapter
//! on every projection too.

mod support;

use std::sync::Arc;

use nocturne::adapter::{LoraAdapter, Target};
use nocturne::budget::{KvPrecision, PlanSettings, PREFILL_BLOCK};
use nocturne::decoder::Decoder;
use nocturne::profile::Precision;
use nocturne::weights::{Matrix, ModelPack};
use support::adapter::random_adapter;
use support::{tiny_config, write_pack};

fn dense(m: Matrix<'_>) -> (Vec<f32>, usize) {
    match m {
        Matrix::Int8 { cols, values, scales, .. } => {
            (values.iter().enumerate().map(|(i, &q)| q as f32 * scales[i / 32].to_f32()).collect(), cols)
        }
        Matrix::F16 { cols, values, .. } => (values.iter().map(|v| v.to_f32()).collect(), cols),
    }
}

fn matvec(m: Matrix<'_>, x: &[f32]) -> Vec<f32> {
    let (w, cols) = dense(m);
    w.chunks(cols).map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum()).collect()
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    x.iter().zip(w).map(|(v, w)| v / (ms + eps).sqrt() * w).collect()
}

fn rope(x: &mut [f32], d: usize, pos: usize, base: f32) {
    for head in x.chunks_mut(d) {
        for i in 0..d / 2 {
            let angle = pos as f64 * (base as f64).powf(-2.0 * i as f64 / d as f64);
            let (c, s) = (angle.cos() as f32, angle.sin() as f32);
            let (a, b) = (head[i], head[i + d / 2]);
            head[i] = a * c - b * s;
            head[i + d / 2] = b * c + a * s;
        }
    }
}

/// `W x`, plus `scale · B (A x)` when the adapter targets this projection.
fn project(m: Matrix<'_>, adapter: Option<&LoraAdapter>, layer: usize, target: Target, x: &[f32]) -> Vec<f32> {
    let mut y = matvec(m, x);
    if let Some((a, b)) = adapter.and_then(|ad| ad.projection(layer, target)) {
        let scale = adapter.unwrap().scale();
        y.iter_mut().zip(matvec(b, &matvec(a, x))).for_each(|(y, d)| *y += scale * d);
    }
    y
}

/// Logits after each token, computed one position at a time.
fn reference(pack: &ModelPack, tokens: &[u32], adapter: Option<&LoraAdapter>) -> Vec<Vec<f32>> {
    let c = pack.config();
    let (d, heads, group) = (c.head_dim, c.num_attention_heads, c.num_attention_heads / c.num_key_value_heads);
    let (embed, h) = dense(pack.embed_tokens());
    let mut keys: Vec<Vec<Vec<f32>>> = vec![Vec::new(); c.num_hidden_layers];
    let mut values = keys.clone();
    let mut out = Vec::new();
    for (pos, &t) in tokens.iter().enumerate() {
        let mut x = embed[t as usize * h..(t as usize + 1) * h].to_vec();
        for l in 0..c.num_hidden_layers {
            let w = pack.layer(l);
            let xn = rms_norm(&x, w.input_norm, c.rms_norm_eps);
            let mut q = project(w.q_proj, adapter, l, Target::Q, &xn);
            let mut k = project(w.k_proj, adapter, l, Target::K, &xn);
            rope(&mut q, d, pos, c.rope_theta);
            rope(&mut k, d, pos, c.rope_theta);
            keys[l].push(k);
            values[l].push(project(w.v_proj, adapter, l, Target::V, &xn));
            let mut att = vec![0.0; heads * d];
            for hh in 0..heads {
                let g = hh / group;
                let qh = &q[hh * d..(hh + 1) * d];
                let scores: Vec<f32> = keys[l]
                    .iter()
                    .map(|k| k[g * d..(g + 1) * d].iter().zip(qh).map(|(a, b)| a * b).sum::<f32>() / (d as f32).sqrt())
                    .collect();
                let max = scores.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = e.iter().sum();
                for (p, v) in e.iter().zip(&values[l]) {
                    for i in 0..d {
                        att[hh * d + i] += p / sum * v[g * d + i];
                    }
                }
            }
            x.iter_mut().zip(project(w.o_proj, adapter, l, Target::O, &att)).for_each(|(x, o)| *x += o);
            let xn = rms_norm(&x, w.post_attention_norm, c.rms_norm_eps);
            let up = project(w.up_proj, adapter, l, Target::Up, &xn);
            let act: Vec<f32> = project(w.gate_proj, adapter, l, Target::Gate, &xn)
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            x.iter_mut().zip(project(w.down_proj, adapter, l, Target::Down, &act)).for_each(|(x, o)| *x += o);
        }
        out.push(matvec(pack.lm_head(), &rms_norm(&x, pack.final_norm(), c.rms_norm_eps)));
    }
    out
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-4 * scale, "{what}: max difference {worst} against max |logit| {scale}");
}

#[test]
fn decoder_matches_reference_forward() {
    check_against_reference(false);
}

#[test]
fn decoder_with_an_adapter_on_every_projection_matches_reference_forward() {
    check_against_reference(true);
}

fn check_against_reference(with_adapter: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let tokens: Vec<u32> = (0..52).map(|i| (i * 37 + 5) % 96).collect();
    let prefill = 41; // one full block and a partial one
    let trainer = nocturne::signing::generate().unwrap();
    for precision in [Precision::Fp16, Precision::Int8] {
        let dir = tmp.path().join(precision.name());
        write_pack(&dir, &tiny_config(64, 3, precision));
        let pack = ModelPack::open(&dir).unwrap();
        let adapter = with_adapter.then(|| {
            let bundle = random_adapter(&tmp.path().join("adapters"), &pack, &trainer, 4, &Target::ALL, 0.1, 7);
            Arc::new(LoraAdapter::open(&bundle, &pack, &trainer.verifying_key()).unwrap())
        });
        let want = reference(&pack, &tokens, adapter.as_deref());
        if with_adapter {
            let base = reference(&pack, &tokens[..1], None);
            let moved = base[0].iter().zip(&want[0]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(moved > 1e-3, "the adapter changes the logits ({moved})");
        }
        for threads in [1, 2] {
            let settings = PlanSettings {
                context_tokens: 64,
                prefill_block: PREFILL_BLOCK,
                threads,
                kv: KvPrecision::F32,
                logit_rows: PREFILL_BLOCK,
                int8_activations: false,
            };
            let mut decoder = Decoder::new(&pack, settings);
            decoder.set_adapter(adapter.clone());
            let mut seen = 0;
            decoder
                .forward_all(&tokens[..prefill], |i, logits| {
                    assert_close(logits, &want[i], &format!("{} prefill token {i}, {threads} threads", precision.name()));
                    seen += 1;
                })
                .unwrap();
            assert_eq!(seen, prefill);
            for i in prefill..tokens.len() {
                let logits = decoder.forward(&tokens[i..i + 1]).unwrap();
                assert_close(logits, &want[i], &format!("{} decode token {i}, {threads} threads", precision.name()));
            }
            // Rewinding and replaying gives the same logits.
            decoder.truncate(10);
            let logits = decoder.forward(&tokens[10..20]).unwrap();
            assert_close(logits, &want[19], "replay after truncate");
            // A scoped adapter set aside: the base model's logits, from a cleared cache.
            if with_adapter {
                assert!(decoder.apply_adapter(false) && decoder.position() == 0, "setting the adapter aside clears the cache");
                assert!(!decoder.apply_adapter(false), "no change");
                let base = reference(&pack, &tokens[..1], None);
                assert_close(decoder.forward(&tokens[..1]).unwrap(), &base[0], "adapter set aside");
                assert!(decoder.applied_adapter().is_none() && decoder.adapter().is_some());
                assert!(decoder.apply_adapter(true) && decoder.position() == 0);
                assert_close(decoder.forward(&tokens[..1]).unwrap(), &want[0], "adapter applied again");
            }
        }
    }
}

#[test]
fn decoder_rejects_bad_input_without_changing_state() {
    let tmp = tempfile::tempdir().unwrap();
    write_pack(tmp.path(), &tiny_config(64, 1, Precision::Int8));
    let pack = ModelPack::open(tmp.path()).unwrap();
    let settings = PlanSettings { context_tokens: 16, prefill_block: 8, threads: 1, kv: KvPrecision::F16, logit_rows: 1, int8_activations: false };
    let mut decoder = Decoder::new(&pack, settings);
    decoder.forward(&[1, 2, 3]).unwrap();
    assert!(matches!(decoder.forward(&[]), Err(nocturne::decoder::DecodeError::Empty)));
    assert!(matches!(decoder.forward(&[4, 96]), Err(nocturne::decoder::DecodeError::TokenOutOfRange { id: 96, .. })));
    assert!(matches!(
        decoder.forward(&[0; 14]),
        Err(nocturne::decoder::DecodeError::ContextFull { needed: 17, capacity: 16 })
    ));
    assert_eq!(decoder.position(), 3);
}
