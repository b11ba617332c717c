//! The RL pieces between sampling and the backward pass: semantic clusters and rewards, entropy
//! filtering, group advantages, and the clipped policy loss with its per-token gradient.
//! All of it is host-side arithmetic over per-token or per-sequence scalars.

use std::f64;

/// Which answers of a group mean the same thing. `answers[i]` is None when completion i has no
/// extractable answer; it then belongs to no cluster.
/// Returns the cluster id of each completion (None for no answer) and the cluster sizes.
pub fn cluster_answers(
    answers: &[Option<String>],
    equiv: impl Fn(&str, &str) -> bool,
) -> (Vec<Option<usize>>, Vec<usize>) {
    let mut reps: Vec<&str> = Vec::new();
    let mut sizes: Vec<usize> = Vec::new();
    let mut ids = Vec::with_capacity(answers.len());
    for a in answers {
        let Some(a) = a.as_deref() else {
            ids.push(None);
            continue;
        };
        // Compare with each cluster's first member: equivalence checks are the cost, and a
        // grader's "equivalent" is not guaranteed transitive anyway.
        match reps.iter().position(|r| *r == a || equiv(a, r)) {
            Some(c) => {
                sizes[c] += 1;
                ids.push(Some(c));
            }
            None => {
                reps.push(a);
                sizes.push(1);
                ids.push(Some(sizes.len() - 1));
            }
        }
    }
    (ids, sizes)
}

/// What EMPO knows about one group of G completions of a question.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupStats {
    /// Reward of each completion: its cluster's size / G, 0 without an answer.
    pub rewards: Vec<f32>,
    /// −Σ p ln p over clusters, p = cluster size / number of answered completions.
    pub semantic_entropy: f32,
    /// Largest cluster / G.
    pub majority_share: f32,
    /// Index of a completion in the largest cluster (the majority answer), if any answered.
    pub majority_member: Option<usize>,
}

pub fn group_stats(cluster_ids: &[Option<usize>], sizes: &[usize]) -> GroupStats {
    let g = cluster_ids.len().max(1) as f32;
    let rewards = cluster_ids
        .iter()
        .map(|c| c.map_or(0.0, |c| sizes[c] as f32 / g))
        .collect();
    let answered: usize = sizes.iter().sum();
    let semantic_entropy = if answered == 0 {
        0.0
    } else {
        -sizes
            .iter()
            .map(|&s| {
                let p = s as f64 / answered as f64;
                p * p.ln()
            })
            .sum::<f64>() as f32
    };
    let best = sizes
        .iter()
        .enumerate()
        .max_by_key(|&(i, &s)| (s, std::cmp::Reverse(i)));
    let majority_member = best.and_then(|(c, _)| cluster_ids.iter().position(|&x| x == Some(c)));
    GroupStats {
        rewards,
        semantic_entropy: semantic_entropy.max(0.0),
        majority_share: best.map_or(0.0, |(_, &s)| s as f32 / g),
        majority_member,
    }
}

/// The paper's entropy thresholding: keep a question whose semantic entropy lies in [min, max].
pub fn entropy_in_band(se: f32, min: f32, max: f32) -> bool {
    se >= min && se <= max
}

/// A_i = (r_i − mean) / (std + 1e-6) with the unbiased (n − 1) standard deviation.
pub fn group_advantages(rewards: &[f32]) -> Vec<f32> {
    let n = rewards.len();
    if n < 2 {
        return vec![0.0; n];
    }
    let mean = rewards.iter().map(|&r| r as f64).sum::<f64>() / n as f64;
    let var = rewards
        .iter()
        .map(|&r| (r as f64 - mean).powi(2))
        .sum::<f64>()
        / (n - 1) as f64;
    let std = var.sqrt();
    rewards
        .iter()
        .map(|&r| ((r as f64 - mean) / (std + 1e-6)) as f32)
        .collect()
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyLoss {
    /// Token-level PPO clipped ratio (GRPO, DAPO).
    Grpo,
    /// Group Sequence Policy Optimization: one ratio per sequence, the exp of the mean
    /// token log-ratio.
    Gspo,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum LossAgg {
    #[value(name = "token-mean")]
    #[serde(rename = "token-mean")]
    TokenMean,
    #[value(name = "seq-mean-token-mean")]
    #[serde(rename = "seq-mean-token-mean")]
    SeqMeanTokenMean,
    #[value(name = "seq-mean-token-sum")]
    #[serde(rename = "seq-mean-token-sum")]
    SeqMeanTokenSum,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipConfig {
    pub kind: PolicyLoss,
    pub eps_low: f32,
    pub eps_high: f32,
    /// Dual-clip bound c (> 1) on the loss of negative-advantage tokens; None disables it.
    pub dual_clip: Option<f32>,
    pub agg: LossAgg,
}

/// One sequence's tokens in a policy-loss call.
#[derive(Debug, Clone, Copy)]
pub struct SeqSpan {
    pub start: usize,
    pub len: usize,
    pub advantage: f32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PolicyLossStats {
    pub loss: f64,
    /// Fraction of tokens whose clipped term was the active one.
    pub clip_fraction: f64,
    /// Mean of the k3 estimator (ρ − 1) − ln ρ of KL(π_old ‖ π).
    pub approx_kl: f64,
}

/// The clipped surrogate for one token given its ratio, and d(loss)/d(ratio).
fn clipped_term(ratio: f64, adv: f64, c: &ClipConfig) -> (f64, f64, bool) {
    let lo = 1.0 - c.eps_low as f64;
    let hi = 1.0 + c.eps_high as f64;
    let unclipped = -adv * ratio;
    let clipped = -adv * ratio.clamp(lo, hi);
    // max of the two losses = min of the two objectives; at a tie the unclipped branch
    // carries the gradient (the two agree there when the ratio is inside the range).
    let (mut loss, mut dratio, mut was_clipped) = if unclipped >= clipped {
        (unclipped, -adv, false)
    } else {
        (clipped, 0.0, true)
    };
    if let Some(cd) = c.dual_clip {
        if adv < 0.0 && loss > -adv * cd as f64 {
            loss = -adv * cd as f64;
            dratio = 0.0;
            was_clipped = true;
        }
    }
    (loss, dratio, was_clipped)
}

/// Policy loss over the tokens of `spans`, aggregated across the whole mini-batch, and
/// d(loss)/d(logπ) for every token (zero outside the spans).
///
/// `total_tokens` and `total_seqs` are the mini-batch totals used by the aggregation, so
/// that a mini-batch split into several calls (micro-batches) sums to the same loss.
pub fn policy_loss(
    logp: &[f32],
    logp_old: &[f32],
    spans: &[SeqSpan],
    c: &ClipConfig,
    total_tokens: usize,
    total_seqs: usize,
) -> (PolicyLossStats, Vec<f32>) {
    let mut dlogp = vec![0.0f32; logp.len()];
    let mut st = PolicyLossStats::default();
    let mut n_tok = 0usize;
    for s in spans {
        if s.len == 0 {
            continue;
        }
        let weight = match c.agg {
            LossAgg::TokenMean => 1.0 / total_tokens.max(1) as f64,
            LossAgg::SeqMeanTokenMean => 1.0 / (total_seqs.max(1) * s.len) as f64,
            LossAgg::SeqMeanTokenSum => 1.0 / total_seqs.max(1) as f64,
        };
        let adv = s.advantage as f64;
        let range = s.start..s.start + s.len;
        let seq_ratio = match c.kind {
            PolicyLoss::Gspo => {
                let mean_lr = range
                    .clone()
                    .map(|t| (logp[t] - logp_old[t]) as f64)
                    .sum::<f64>()
                    / s.len as f64;
                Some(mean_lr.exp())
            }
            PolicyLoss::Grpo => None,
        };
        for t in range {
            let log_ratio = (logp[t] - logp_old[t]) as f64;
            let tok_ratio = log_ratio.exp();
            // GSPO gives every token the sequence ratio as its value; its gradient with
            // respect to logπ_t is that ratio times ∂logπ_t, as in the token form of GSPO.
            let ratio = seq_ratio.unwrap_or(tok_ratio);
            let (l, dratio, clipped) = clipped_term(ratio, adv, c);
            st.loss += weight * l;
            dlogp[t] = (weight * dratio * ratio) as f32;
            st.clip_fraction += clipped as u8 as f64;
            st.approx_kl += tok_ratio - 1.0 - log_ratio;
            n_tok += 1;
        }
    }
    if n_tok > 0 {
        st.clip_fraction /= n_tok as f64;
        st.approx_kl /= n_tok as f64;
    }
    (st, dlogp)
}

/// β·k3(π_ref ‖ π) per token, summed with weight 1/total_tokens, and its d/dlogπ:
/// k3 = e^(ref − logπ) − (ref − logπ) − 1, the low-variance KL estimator (always ≥ 0).
pub fn kl_penalty(
    logp: &[f32],
    logp_ref: &[f32],
    beta: f32,
    total_tokens: usize,
) -> (f64, Vec<f32>) {
    let w = beta as f64 / total_tokens.max(1) as f64;
    let mut loss = 0.0;
    let d = logp
        .iter()
        .zip(logp_ref)
        .map(|(&lp, &rf)| {
            let x = (rf - lp) as f64;
            loss += w * (x.exp() - x - 1.0);
            (w * (1.0 - x.exp())) as f32
        })
        .collect();
    (loss, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Option<String> {
        Some(x.to_string())
    }

    #[test]
    fn rewards_are_cluster_shares_and_no_answer_gets_zero() {
        let answers = [s("2"), s("2.0"), s("3"), None, s("2")];
        let (ids, sizes) = cluster_answers(&answers, |a, b| {
            a.parse::<f64>().ok() == b.parse::<f64>().ok()
        });
        assert_eq!(ids, vec![Some(0), Some(0), Some(1), None, Some(0)]);
        assert_eq!(sizes, vec![3, 1]);
        let g = group_stats(&ids, &sizes);
        assert_eq!(g.rewards, vec![0.6, 0.6, 0.2, 0.0, 0.6]);
        let want_se = -(0.75f64 * 0.75f64.ln() + 0.25 * 0.25f64.ln());
        assert!((g.semantic_entropy as f64 - want_se).abs() < 1e-6);
        assert!((g.majority_share - 0.6).abs() < 1e-7);
        assert_eq!(g.majority_member, Some(0));
    }

    #[test]
    fn unanimous_group_has_zero_entropy_and_zero_advantages() {
        let answers = [s("4"), s("4"), s("4")];
        let (ids, sizes) = cluster_answers(&answers, |a, b| a == b);
        let g = group_stats(&ids, &sizes);
        assert_eq!(g.semantic_entropy, 0.0);
        assert!(!entropy_in_band(g.semantic_entropy, 0.05, 10.0));
        assert_eq!(group_advantages(&g.rewards), vec![0.0; 3]);
        let none = group_stats(&[None, None], &[]);
        assert_eq!((none.semantic_entropy, none.majority_member), (0.0, None));
    }

    #[test]
    fn advantages_use_unbiased_std() {
        let a = group_advantages(&[0.5, 0.5, 0.25, 0.0]);
        // mean 0.3125, unbiased std sqrt(0.0989583..) = 0.31457...
        let std = ((2.0 * 0.1875f64.powi(2) + 0.0625f64.powi(2) + 0.3125f64.powi(2)) / 3.0).sqrt();
        assert!((a[0] as f64 - 0.1875 / (std + 1e-6)).abs() < 1e-6);
        assert!((a[3] as f64 + 0.3125 / (std + 1e-6)).abs() < 1e-6);
    }

    fn cfg(kind: PolicyLoss, agg: LossAgg) -> ClipConfig {
        ClipConfig {
            kind,
            eps_low: 0.2,
            eps_high: 0.2,
            dual_clip: None,
            agg,
        }
    }

    #[test]
    fn on_policy_gradient_is_minus_advantage_weighted() {
        let logp = [-1.0, -2.0, -0.5, -0.7, -3.0];
        let spans = [
            SeqSpan {
                start: 0,
                len: 2,
                advantage: 1.5,
            },
            SeqSpan {
                start: 2,
                len: 3,
                advantage: -0.5,
            },
        ];
        let (st, d) = policy_loss(
            &logp,
            &logp,
            &spans,
            &cfg(PolicyLoss::Grpo, LossAgg::TokenMean),
            5,
            2,
        );
        assert!((st.loss - (-(1.5 * 2.0) + 0.5 * 3.0) / 5.0).abs() < 1e-9);
        assert_eq!(d, vec![-0.3, -0.3, 0.1, 0.1, 0.1]);
        assert_eq!((st.clip_fraction, st.approx_kl), (0.0, 0.0));
        let (_, d) = policy_loss(
            &logp,
            &logp,
            &spans,
            &cfg(PolicyLoss::Grpo, LossAgg::SeqMeanTokenMean),
            5,
            2,
        );
        assert!((d[0] + 1.5 / 4.0).abs() < 1e-7 && (d[2] - 0.5 / 6.0).abs() < 1e-7);
        let (_, d) = policy_loss(
            &logp,
            &logp,
            &spans,
            &cfg(PolicyLoss::Grpo, LossAgg::SeqMeanTokenSum),
            5,
            2,
        );
        assert!((d[0] + 0.75).abs() < 1e-7 && (d[4] - 0.25).abs() < 1e-7);
        // At ratio 1, GSPO's gradient equals GRPO's with seq-mean-token-mean.
        let (_, dg) = policy_loss(
            &logp,
            &logp,
            &spans,
            &cfg(PolicyLoss::Gspo, LossAgg::SeqMeanTokenMean),
            5,
            2,
        );
        let (_, dt) = policy_loss(
            &logp,
            &logp,
            &spans,
            &cfg(PolicyLoss::Grpo, LossAgg::SeqMeanTokenMean),
            5,
            2,
        );
        assert_eq!(dg, dt);
    }

    #[test]
    fn clipping_stops_the_gradient_outside_the_trust_region() {
        let old = [0.0f32, 0.0, 0.0];
        // ratios e^0.5 = 1.65 (A > 0: clipped), e^-0.5 = 0.61 (A > 0: not clipped, loss larger)
        let logp = [0.5f32, -0.5, 0.5];
        let spans = [
            SeqSpan {
                start: 0,
                len: 1,
                advantage: 1.0,
            },
            SeqSpan {
                start: 1,
                len: 1,
                advantage: 1.0,
            },
            SeqSpan {
                start: 2,
                len: 1,
                advantage: -1.0,
            },
        ];
        let (st, d) = policy_loss(
            &logp,
            &old,
            &spans,
            &cfg(PolicyLoss::Grpo, LossAgg::SeqMeanTokenSum),
            3,
            1,
        );
        assert_eq!(d[0], 0.0);
        assert!((d[1] as f64 + (-0.5f64).exp()).abs() < 1e-6);
        // A < 0 with ratio 1.65: the unclipped loss (1.65) is the larger, so it is kept.
        assert!((d[2] as f64 - 0.5f64.exp()).abs() < 1e-6);
        assert!((st.clip_fraction - 1.0 / 3.0).abs() < 1e-12);
        let k3 = |lr: f64| lr.exp() - 1.0 - lr;
        assert!((st.approx_kl - (2.0 * k3(0.5) + k3(-0.5)) / 3.0).abs() < 1e-9);
        // Dual clip caps the negative-advantage loss at c·|A|.
        let mut c = cfg(PolicyLoss::Grpo, LossAgg::SeqMeanTokenSum);
        c.dual_clip = Some(1.5);
        let logp = [1.0f32];
        let (st, d) = policy_loss(
            &logp,
            &[0.0],
            &[SeqSpan {
                start: 0,
                len: 1,
                advantage: -1.0,
            }],
            &c,
            1,
            1,
        );
        assert!((st.loss - 1.5).abs() < 1e-9 && d[0] == 0.0);
    }

    #[test]
    fn kl_penalty_is_zero_at_the_reference_and_matches_finite_differences() {
        let (l, d) = kl_penalty(&[-1.0, -2.0], &[-1.0, -2.0], 0.1, 2);
        assert_eq!((l, d), (0.0, vec![0.0, 0.0]));
        let rf = [-1.0f32, -0.4];
        let lp = [-1.3f32, -0.2];
        let (_, d) = kl_penalty(&lp, &rf, 0.5, 2);
        for t in 0..2 {
            let mut p = lp;
            p[t] += 1e-3;
            let up = kl_penalty(&p, &rf, 0.5, 2).0;
            p[t] -= 2e-3;
            let dn = kl_penalty(&p, &rf, 0.5, 2).0;
            assert!(((up - dn) / 2e-3 - d[t] as f64).abs() < 1e-4);
        }
    }

    #[test]
    fn policy_loss_gradient_matches_finite_differences() {
        let old = [-1.0f32, -1.2, -0.3, -2.0];
        let logp = [-0.9f32, -1.25, -0.1, -2.3];
        let spans = [
            SeqSpan {
                start: 0,
                len: 2,
                advantage: 0.7,
            },
            SeqSpan {
                start: 2,
                len: 2,
                advantage: -1.1,
            },
        ];
        for kind in [PolicyLoss::Grpo, PolicyLoss::Gspo] {
            let c = ClipConfig {
                kind,
                eps_low: 0.2,
                eps_high: 0.28,
                dual_clip: Some(3.0),
                agg: LossAgg::TokenMean,
            };
            let (_, d) = policy_loss(&logp, &old, &spans, &c, 4, 2);
            for t in 0..4 {
                let h = 1e-3f32;
                let mut p = logp;
                p[t] += h;
                let lp = policy_loss(&p, &old, &spans, &c, 4, 2).0.loss;
                p[t] -= 2.0 * h;
                let lm = policy_loss(&p, &old, &spans, &c, 4, 2).0.loss;
                let fd = (lp - lm) / (2.0 * h as f64);
                assert!(
                    (fd - d[t] as f64).abs() < 1e-4,
                    "{kind:?} token {t}: fd {fd} vs {}",
                    d[t]
                );
            }
        }
    }
}
