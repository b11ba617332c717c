//! Token sampling on the host: greedy, temperature, top-k, top-p, with counter-based
//! randomness so that a draw depends only on (seed, sequence, step), never on batch order.

/// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3"). Counter-based:
/// the GPU sampler evaluates the same function, so both backends draw the same numbers.
pub fn philox4x32(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    const M0: u64 = 0xD251_1F53;
    const M1: u64 = 0xCD9E_8D57;
    const W0: u32 = 0x9E37_79B9;
    const W1: u32 = 0xBB67_AE85;
    let (mut c, mut k) = (counter, key);
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let p0 = M0 * c[0] as u64;
        let p1 = M1 * c[2] as u64;
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// A uniform draw in [0, 1) for (seed, sequence, step).
pub fn uniform(seed: u64, sequence: u64, step: u64) -> f32 {
    let out = philox4x32(
        [
            step as u32,
            (step >> 32) as u32,
            sequence as u32,
            (sequence >> 32) as u32,
        ],
        [seed as u32, (seed >> 32) as u32],
    );
    (out[0] >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
}

/// What one draw is keyed on: the stream (a group's seed), the sequence within it and the
/// token's step within that sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrawKey {
    pub seed: u64,
    pub sequence: u64,
    pub step: u64,
}

impl DrawKey {
    pub fn uniform(&self) -> f32 {
        uniform(self.seed, self.sequence, self.step)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1 disables top-p.
    pub top_p: f32,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

/// Index of the largest logit; the first one wins ties, as torch.argmax does.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The distribution sampling draws from after temperature, top-k and top-p, as
/// (token, probability) pairs with probabilities summing to 1, most likely first when
/// truncation sorted them. Also the reference the GPU sampler's chi-square test compares to.
pub fn truncated_distribution(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f64)> {
    let t = p.temperature as f64;
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, ((x as f64 - m) / t).exp()))
        .collect();
    let truncate = (p.top_k > 0 && p.top_k < logits.len()) || p.top_p < 1.0;
    if truncate {
        // Stable sort: equal probabilities keep token order, so ties are deterministic.
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 {
            probs.truncate(p.top_k);
        }
        if p.top_p < 1.0 {
            let total: f64 = probs.iter().map(|x| x.1).sum();
            // Keep a token while the mass before it is below top_p: the smallest set whose
            // mass reaches top_p, and always at least one token.
            let mut before = 0.0;
            let mut keep = 0;
            for &(_, q) in &probs {
                if keep > 0 && before >= p.top_p as f64 * total {
                    break;
                }
                before += q;
                keep += 1;
            }
            probs.truncate(keep);
        }
    }
    let total: f64 = probs.iter().map(|x| x.1).sum();
    for x in probs.iter_mut() {
        x.1 /= total;
    }
    probs
}

/// Draws one token from a row of logits using the uniform `u` in [0, 1).
pub fn sample(logits: &[f32], p: &SamplingParams, u: f32) -> u32 {
    if p.temperature <= 0.0 {
        return argmax(logits);
    }
    let dist = truncated_distribution(logits, p);
    let mut acc = 0.0f64;
    for &(tok, q) in &dist {
        acc += q;
        if (u as f64) < acc {
            return tok;
        }
    }
    dist.last().map(|x| x.0).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_known_answer() {
        // Known-answer vectors of Philox4x32-10 from the Random123 distribution's kat_vectors.
        assert_eq!(
            philox4x32([0, 0, 0, 0], [0, 0]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn truncation_keeps_smallest_nucleus() {
        // probs ∝ [4, 3, 2, 1] / 10
        let logits: Vec<f32> = [4.0f32, 3.0, 2.0, 1.0].iter().map(|x| x.ln()).collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.6,
        };
        let d = truncated_distribution(&logits, &p);
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 1]);
        assert!((d[0].1 - 4.0 / 7.0).abs() < 1e-6);
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 3,
            top_p: 1.0,
        };
        let d = truncated_distribution(&logits, &p);
        assert_eq!(d.len(), 3);
        assert!((d[2].1 - 2.0 / 9.0).abs() < 1e-6);
    }

    #[test]
    fn sampling_frequencies_match_softmax() {
        let logits = [0.5f32, -1.0, 2.0, 0.0, 1.0];
        let p = SamplingParams {
            temperature: 0.8,
            top_k: 0,
            top_p: 1.0,
        };
        let dist = truncated_distribution(&logits, &p);
        let n = 200_000u64;
        let mut counts = [0u64; 5];
        for i in 0..n {
            counts[sample(&logits, &p, uniform(7, i, 3)) as usize] += 1;
        }
        // Chi-square with 4 degrees of freedom; 18.47 is the 0.999 quantile.
        let chi2: f64 = dist
            .iter()
            .map(|&(t, q)| {
                let e = q * n as f64;
                (counts[t as usize] as f64 - e).powi(2) / e
            })
            .sum();
        assert!(chi2 < 18.47, "chi2 {chi2}, counts {counts:?}");
    }
}
