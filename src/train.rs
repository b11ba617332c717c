//! The training drivers: EMPO (default), one-shot EM, and the GRPO/TTRL baselines. They share
//! rollout collection, scoring of groups, the per-sequence forward/backward and checkpoints, and
//! never know which backend runs them.

use crate::backend::{Backend, RowStats, NO_TARGET};
use crate::checkpoint;
use crate::config::ModelConfig;
use crate::data::{Example, Prompt};
use crate::grader::{self, GoldAnswer};
use crate::lm_head::Coef;
use crate::memory_plan::{self, Budget, RunShape, Switch};
use crate::model::{Activations, Params, Qwen2};
use crate::optim::{OptimConfig, Optimizer};
use crate::rl::{self, ClipConfig, LossAgg, PolicyLoss, SeqSpan};
use crate::sampling::SamplingParams;
use crate::tokenizer::{ChatMessage, Tokenizer};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algo {
    /// Semantic-entropy minimization with cluster-share rewards (no labels).
    Empo,
    /// One-shot entropy minimization of the model's own samples (no labels).
    Em,
    /// Rule reward from gold answers (+1 correct, −0.5 wrong, −1 no answer): a supervised baseline.
    Grpo,
    /// Majority-vote reward (test-time RL): 1 for the majority cluster, 0 otherwise.
    Ttrl,
    /// Supervised next-token training on completions (the `sft` command).
    #[value(skip)]
    Sft,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PromptTemplate {
    /// The model's chat template, the question as the user turn plus the suffix.
    ChatSuffix,
    /// The chat template with the system prompt asking for a boxed answer.
    System,
    /// The text as it is.
    Raw,
}

/// Inside a checkpoint: step, data position and optimizer step; beside it in resume/ the f32
/// master weights and optimizer moments.
pub const RESUME_STATE: &str = "resume/trainer_state.json";
/// The f32 weights and AdamW moments beside it.
const MASTER: &str = "resume/master_weights.safetensors";
const MOMENT_M: &str = "resume/optimizer_m.safetensors";
const MOMENT_V: &str = "resume/optimizer_v.safetensors";

pub const DEFAULT_SUFFIX: &str =
    " Let's think step by step and output the final answer within \\boxed{}.";
pub const SYSTEM_PROMPT: &str =
    "Please reason step by step, and put your final answer within \\boxed{}.";

/// Every resolved setting of a run; written to OUT/config.json and read back by --resume.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub engine_version: String,
    pub algo: Algo,
    pub weights: PathBuf,
    pub data: Option<PathBuf>,
    pub rollouts: Option<PathBuf>,
    pub prompts_per_step: Option<usize>,
    pub prompt_template: PromptTemplate,
    pub suffix: String,
    pub group_size: usize,
    /// Sequences decoded together while sampling (`generate::generate_batch`); 0: the memory
    /// plan's widest batch on a GPU, 64 on the CPU, at most one round's prompts × G.
    #[serde(default)]
    pub rollout_rows: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub max_new_tokens: usize,
    pub entropy_min: f32,
    pub entropy_max: f32,
    /// Extra sampling rounds to refill questions dropped by the entropy band.
    pub max_refill_rounds: usize,
    pub policy_loss: PolicyLoss,
    pub loss_agg: LossAgg,
    pub clip_low: f32,
    pub clip_high: f32,
    pub dual_clip: Option<f32>,
    /// Weight of the KL penalty to the initial weights; 0 (default) loads no reference model.
    #[serde(default)]
    pub kl_coef: f32,
    /// Activation checkpointing (`Qwen2::recompute`); `auto` turns it on only where the run
    /// would not fit on the GPU without it (`memory_plan::resolve`).
    #[serde(default)]
    pub recompute: Switch,
    /// AdamW's moments in host memory (`optim::MomentStore::Host`); `auto` offloads them only
    /// where the run would not fit on the GPU otherwise, even with recompute.
    #[serde(default)]
    pub offload_optimizer: Switch,
    pub mini_batches: usize,
    pub ppo_epochs: usize,
    pub optim: OptimConfig,
    pub steps: usize,
    pub seed: u64,
    pub save_every: usize,
    pub out: PathBuf,
}

/// A question with its sampled (or replayed) completions.
#[derive(Debug, Clone)]
pub struct Group {
    pub prompt_ids: Vec<u32>,
    pub completions: Vec<Vec<u32>>,
    /// Completion texts (decoded, or as given by a text rollout file).
    pub texts: Vec<String>,
    pub gold: Option<GoldAnswer>,
}

/// One sequence to train on: prompt ++ completion, and its weight in the loss.
struct TrainSeq {
    ids: Vec<u32>,
    prompt_len: usize,
    advantage: f32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainerState {
    /// Train steps finished.
    pub step: usize,
    /// Next record of the data or rollout file.
    pub data_pos: usize,
    pub optimizer_step: u64,
}

/// Where prompts or rollouts come from.
pub enum Source {
    Prompts(Vec<Example>),
    Rollouts(Vec<RolloutRecord>),
    Supervised(Vec<SftRecord>),
}

/// The longest prompt and the longest sequence a backward will run over, in tokens, for the
/// memory plan: every prompt is rendered and tokenized once (about a second for 20,000). None
/// for supervised data, whose batches are planned by their size instead.
pub fn run_lengths(
    tok: &Tokenizer,
    cfg: &TrainConfig,
    source: &Source,
) -> Result<Option<(usize, usize)>> {
    let (mut prompt, mut seq) = (0, 0);
    match source {
        Source::Supervised(_) => return Ok(None),
        Source::Prompts(ex) => {
            for e in ex {
                let text = render_prompt(tok, &e.prompt, cfg.prompt_template, &cfg.suffix)?;
                prompt = prompt.max(tok.encode(&text)?.len());
            }
            seq = prompt + cfg.max_new_tokens;
        }
        Source::Rollouts(recs) => {
            for r in recs {
                let (p, longest) = match r {
                    RolloutRecord::Ids {
                        prompt_ids,
                        completion_ids,
                        ..
                    } => (
                        prompt_ids.len(),
                        completion_ids.iter().map(Vec::len).max().unwrap_or(0),
                    ),
                    RolloutRecord::Text {
                        prompt: q,
                        completions,
                        ..
                    } => {
                        let text = render_prompt(
                            tok,
                            &Prompt::Text(q.clone()),
                            cfg.prompt_template,
                            &cfg.suffix,
                        )?;
                        let mut longest = 0;
                        for c in completions {
                            longest = longest.max(tok.encode(c)?.len());
                        }
                        (tok.encode(&text)?.len(), longest)
                    }
                };
                prompt = prompt.max(p);
                seq = seq.max(p + longest);
            }
        }
    }
    Ok(Some((prompt, seq)))
}

/// The memory settings a run takes (`plan_memory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemorySettings {
    pub recompute: bool,
    pub offload_optimizer: bool,
    /// `TrainConfig::rollout_rows` settled: 0 where nothing is sampled.
    pub rollout_rows: usize,
}

/// Records a run samples from.
fn source_len(source: &Source) -> usize {
    match source {
        Source::Prompts(p) => p.len(),
        Source::Rollouts(r) => r.len(),
        Source::Supervised(r) => r.len(),
    }
}

/// Sequences decoded together on a backend without a device memory to plan against.
const HOST_ROLLOUT_ROWS: usize = 64;

/// Counts what the run will hold in the backend's and the host's memory (`memory_plan`), prints
/// it, and settles `cfg.recompute` and `cfg.offload_optimizer`. Fails, with the plan and what
/// would fit, where the run cannot fit.
pub fn plan_memory<B: Backend>(
    be: &B,
    model: &ModelConfig,
    cfg: &TrainConfig,
    tok: &Tokenizer,
    source: &Source,
) -> Result<MemorySettings> {
    let Some((prompt, train_seq)) = run_lengths(tok, cfg, source)? else {
        return Ok(MemorySettings {
            recompute: cfg.recompute == Switch::On,
            offload_optimizer: cfg.offload_optimizer == Switch::On,
            rollout_rows: 0,
        });
    };
    let replay = matches!(source, Source::Rollouts(_));
    let group = cfg.group_size.max(1);
    let mut shape = RunShape {
        storage: be.storage_bytes(),
        prompt,
        max_new: if replay { 0 } else { cfg.max_new_tokens },
        rollout_rows: if cfg.rollout_rows > 0 {
            cfg.rollout_rows
        } else {
            group
        },
        train_seq,
        optim: cfg.optim,
        reference: cfg.kl_coef > 0.0,
        recompute: false,
        offload: false,
        unfused_attention: be.attention_variant() == Some("unfused"),
    };
    let budget = Budget::measure(be.device_memory().map(|(free, _)| free as u64));
    let mut plan =
        memory_plan::resolve(model, shape, cfg.recompute, cfg.offload_optimizer, budget)?;
    if cfg.rollout_rows == 0 && !replay {
        // One round samples at most a step's prompts.
        let want = group * cfg.prompts_per_step.unwrap_or(source_len(source)).max(1);
        shape = plan.shape;
        shape.rollout_rows = match budget.device {
            Some(free) => plan.widest_rollout(model, memory_plan::usable(free), want),
            None => want.min(HOST_ROLLOUT_ROWS),
        };
        plan = memory_plan::MemoryPlan::new(model, shape);
    }
    eprintln!("{}", plan.summary(budget.device));
    Ok(MemorySettings {
        recompute: plan.shape.recompute,
        offload_optimizer: plan.host_moments > 0,
        rollout_rows: if replay { 0 } else { plan.shape.rollout_rows },
    })
}

/// A prompt and the completion supervised training teaches.
#[derive(Debug, Clone)]
pub struct SftRecord {
    pub prompt: Prompt,
    pub completion: String,
}

/// Reads `{"prompt"|"problem"|"question": ..., "completion"|"response": ...}` lines.
pub fn load_sft(path: &Path) -> Result<Vec<SftRecord>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read SFT file {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: not valid JSON", at()))?;
        let ex =
            crate::data::example_from_json(&v).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        let completion = ["completion", "response"]
            .iter()
            .find_map(|k| v.get(*k).and_then(|c| c.as_str()))
            .with_context(|| format!("{}: no string field `completion` or `response`", at()))?;
        out.push(SftRecord {
            prompt: ex.prompt,
            completion: completion.to_string(),
        });
    }
    if out.is_empty() {
        bail!("{}: no SFT records", path.display());
    }
    Ok(out)
}

#[derive(Debug, Clone)]
pub enum RolloutRecord {
    Ids {
        prompt_ids: Vec<u32>,
        completion_ids: Vec<Vec<u32>>,
        gold: Option<GoldAnswer>,
    },
    Text {
        prompt: String,
        completions: Vec<String>,
        gold: Option<GoldAnswer>,
    },
}

fn gold_from_json(v: &serde_json::Value) -> Option<GoldAnswer> {
    let g = v.get("gold").or_else(|| v.get("answer"))?;
    match g {
        serde_json::Value::String(s) => Some(GoldAnswer::Text(s.clone())),
        serde_json::Value::Number(n) => n.as_f64().map(GoldAnswer::Number),
        serde_json::Value::Array(a) => Some(GoldAnswer::List(
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
        )),
        _ => None,
    }
}

fn id_list(v: &serde_json::Value) -> Option<Vec<u32>> {
    v.as_array()?
        .iter()
        .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
        .collect()
}

/// Reads a rollout file: one JSON object per line, either
/// `{"prompt_ids": [...], "completion_ids": [[...], ...]}` or `{"prompt": "...", "completions": [...]}`.
pub fn load_rollouts(path: &Path) -> Result<Vec<RolloutRecord>> {
    let f = std::fs::File::open(path)
        .with_context(|| format!("cannot open rollout file {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line =
            line.with_context(|| format!("{}:{}: cannot read line", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("{}: not valid JSON", at()))?;
        let gold = gold_from_json(&v);
        let rec = if let Some(p) = v.get("prompt_ids") {
            let prompt_ids = id_list(p)
                .with_context(|| format!("{}: `prompt_ids` must be a list of token ids", at()))?;
            let comps = v
                .get("completion_ids")
                .and_then(|c| c.as_array())
                .with_context(|| {
                    format!(
                        "{}: `completion_ids` must be a list of token-id lists",
                        at()
                    )
                })?;
            let completion_ids = comps
                .iter()
                .map(id_list)
                .collect::<Option<Vec<_>>>()
                .with_context(|| {
                    format!(
                        "{}: `completion_ids` must be a list of token-id lists",
                        at()
                    )
                })?;
            RolloutRecord::Ids {
                prompt_ids,
                completion_ids,
                gold,
            }
        } else if let Some(p) = v.get("prompt").and_then(|p| p.as_str()) {
            let completions = v
                .get("completions")
                .and_then(|c| c.as_array())
                .and_then(|c| {
                    c.iter()
                        .map(|x| x.as_str().map(str::to_string))
                        .collect::<Option<Vec<_>>>()
                })
                .with_context(|| format!("{}: `completions` must be a list of strings", at()))?;
            RolloutRecord::Text {
                prompt: p.to_string(),
                completions,
                gold,
            }
        } else {
            bail!(
                "{}: expected `prompt_ids`+`completion_ids` or `prompt`+`completions`",
                at()
            );
        };
        out.push(rec);
    }
    if out.is_empty() {
        bail!("{}: no rollout records", path.display());
    }
    Ok(out)
}

/// Renders a question with the chosen template.
pub fn render_prompt(
    tok: &Tokenizer,
    prompt: &Prompt,
    tpl: PromptTemplate,
    suffix: &str,
) -> Result<String> {
    let user_text = |text: &str| ChatMessage {
        role: "user".into(),
        content: format!("{text}{suffix}"),
    };
    Ok(match (prompt, tpl) {
        (Prompt::Text(t), PromptTemplate::Raw) => t.clone(),
        (Prompt::Chat(msgs), PromptTemplate::Raw) => msgs
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        (Prompt::Text(t), PromptTemplate::ChatSuffix) => {
            tok.apply_chat_template(&[user_text(t)], true)?
        }
        // verl-style message lists already carry their instruction.
        (Prompt::Chat(msgs), PromptTemplate::ChatSuffix) => tok.apply_chat_template(msgs, true)?,
        (p, PromptTemplate::System) => {
            let mut msgs = vec![ChatMessage {
                role: "system".into(),
                content: SYSTEM_PROMPT.into(),
            }];
            match p {
                Prompt::Text(t) => msgs.push(ChatMessage {
                    role: "user".into(),
                    content: t.clone(),
                }),
                Prompt::Chat(m) => msgs.extend(m.iter().filter(|x| x.role != "system").cloned()),
            }
            tok.apply_chat_template(&msgs, true)?
        }
    })
}

/// Per-completion rewards and the group's statistics for the label-free and baseline algos.
pub fn score_group(algo: Algo, g: &Group) -> (Vec<f32>, rl::GroupStats, Vec<Option<bool>>) {
    let answers: Vec<Option<String>> = g.texts.iter().map(|t| grader::extract_boxed(t)).collect();
    let (ids, sizes) = rl::cluster_answers(&answers, grader::is_equiv);
    let stats = rl::group_stats(&ids, &sizes);
    let correct: Vec<Option<bool>> = answers
        .iter()
        .map(|a| {
            g.gold
                .as_ref()
                .map(|gold| a.as_ref().is_some_and(|a| grader::grade(a, gold)))
        })
        .collect();
    let rewards = match algo {
        Algo::Empo | Algo::Em | Algo::Sft => stats.rewards.clone(),
        Algo::Ttrl => {
            let maj = stats.majority_member.and_then(|m| ids[m]);
            ids.iter()
                .map(|c| if c.is_some() && *c == maj { 1.0 } else { 0.0 })
                .collect()
        }
        Algo::Grpo => answers
            .iter()
            .zip(&correct)
            .map(|(a, c)| match (a, c) {
                (None, _) => -1.0,
                (Some(_), Some(true)) => 1.0,
                _ => -0.5,
            })
            .collect(),
    };
    (rewards, stats, correct)
}

/// Per-step numbers written to metrics.jsonl.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepMetrics {
    pub step: usize,
    pub loss: f64,
    pub semantic_entropy: f64,
    pub majority_share: f64,
    pub kept_fraction: f64,
    pub clip_fraction: f64,
    pub approx_kl: f64,
    pub grad_norm: f64,
    pub lr: f32,
    pub tokens_per_s: f64,
    pub num_tokens: usize,
    pub mean_reward: f64,
    /// Fraction of completions whose answer matches the gold one (logged, never trained on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label_accuracy: Option<f64>,
    pub seconds: f64,
    /// Most bytes the backend's buffers held so far, in GB, where it tracks them (the GPU):
    /// beside the memory plan printed at the start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_memory_gb: Option<f64>,
}

/// Forward of one sequence up to the final norm, and the target of each row (row r predicts
/// token r + 1; rows before the last prompt token have no target).
fn seq_hidden<B: Backend>(
    be: &B,
    model: &Qwen2<B>,
    s: &TrainSeq,
) -> Result<(Activations<B::Buf>, Vec<u32>)> {
    let seq = s.ids.len();
    let mut acts = model.alloc_activations(be, 1, seq, true)?;
    model.forward_hidden(be, &s.ids, &mut acts)?;
    let targets: Vec<u32> = (0..seq)
        .map(|r| {
            if r + 1 >= s.prompt_len && r + 1 < seq {
                s.ids[r + 1]
            } else {
                NO_TARGET
            }
        })
        .collect();
    Ok((acts, targets))
}

/// Forward + backward of one sequence; `coef` maps (entropies, logprobs) of the completion
/// rows to (d/dentropy, d/dlogprob) per row. A sequence that fits in one lm_head chunk
/// computes its logits once.
fn seq_backward<B: Backend>(
    be: &B,
    model: &Qwen2<B>,
    grads: &mut Params<B::Buf>,
    s: &TrainSeq,
    temperature: f32,
    coef: impl FnOnce(&[f32], &[f32]) -> (Vec<f32>, Vec<f32>),
) -> Result<()> {
    let seq = s.ids.len();
    let (mut acts, targets) = seq_hidden(be, model, s)?;
    let rows = s.prompt_len - 1..seq - 1;
    let row_coef = |stats: &[RowStats]| {
        let ent: Vec<f32> = stats[rows.clone()].iter().map(|x| x.entropy).collect();
        let lp: Vec<f32> = stats[rows.clone()].iter().map(|x| x.logprob).collect();
        let (da, db) = coef(&ent, &lp);
        let mut a = vec![0.0f32; seq];
        let mut b = vec![0.0f32; seq];
        a[rows.clone()].copy_from_slice(&da);
        b[rows.clone()].copy_from_slice(&db);
        (a, b)
    };
    let coef = Coef::Whole(Box::new(row_coef));
    model.lm_head_stats_grad(be, &mut acts, &targets, temperature, coef, grads)?;
    Ok(())
}

/// Log-probs of the completion tokens under the current weights (the "old" policy).
fn seq_logprobs<B: Backend>(
    be: &B,
    model: &Qwen2<B>,
    s: &TrainSeq,
    temperature: f32,
) -> Result<Vec<f32>> {
    let (mut acts, targets) = seq_hidden(be, model, s)?;
    let stats = model.lm_head_stats(be, &mut acts, &targets, temperature)?;
    Ok(stats[s.prompt_len - 1..s.ids.len() - 1]
        .iter()
        .map(|x| x.logprob)
        .collect())
}

pub struct Trainer<'a, B: Backend> {
    pub be: &'a B,
    pub cfg: TrainConfig,
    pub model: Qwen2<B>,
    pub tok: Tokenizer,
    pub opt: Optimizer<B>,
    pub source: Source,
    pub state: TrainerState,
    /// The frozen initial weights, only when --kl-coef > 0.
    pub reference: Option<Qwen2<B>>,
}

impl<'a, B: Backend> Trainer<'a, B> {
    /// A trainer at step 0: the optimizer (its moments in host memory with
    /// `offload_optimizer`), and the frozen reference when --kl-coef > 0.
    pub fn new(
        be: &'a B,
        cfg: TrainConfig,
        model: Qwen2<B>,
        tok: Tokenizer,
        source: Source,
        offload_optimizer: bool,
    ) -> Result<Self> {
        let opt = Optimizer::new(be, &model, cfg.optim, offload_optimizer)?;
        let reference = if cfg.kl_coef > 0.0 {
            let mut r = Qwen2::load_dir(be, &cfg.weights)?;
            r.recompute = model.recompute;
            Some(r)
        } else {
            None
        };
        Ok(Trainer {
            be,
            cfg,
            model,
            tok,
            opt,
            source,
            state: TrainerState::default(),
            reference,
        })
    }

    pub fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.cfg.temperature,
            top_k: self.cfg.top_k,
            top_p: self.cfg.top_p,
        }
    }

    fn source_len(&self) -> usize {
        source_len(&self.source)
    }

    /// The groups of records pos..pos + count (wrapping around the file): replayed, or sampled
    /// together, every record from its own random stream keyed on (step, record) so that a
    /// resumed run, or another batch size, samples the same.
    fn make_groups(&self, pos: usize, count: usize, step: usize) -> Result<Vec<Group>> {
        let Source::Prompts(ex) = &self.source else {
            return (pos..pos + count).map(|p| self.replayed_group(p)).collect();
        };
        let n = self.source_len();
        let prompts: Vec<Vec<u32>> = (pos..pos + count)
            .map(|p| {
                let text = render_prompt(
                    &self.tok,
                    &ex[p % n].prompt,
                    self.cfg.prompt_template,
                    &self.cfg.suffix,
                )?;
                self.tok.encode(&text)
            })
            .collect::<Result<_>>()?;
        let group = self.cfg.group_size.max(1);
        let requests: Vec<crate::generate::Request> = prompts
            .iter()
            .zip(pos..)
            .map(|(prompt, p)| crate::generate::Request {
                prompt,
                n: group,
                seed: self.cfg.seed
                    ^ ((step as u64) << 32)
                    ^ (p as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            })
            .collect();
        let opt = crate::generate::GenerateOptions {
            max_new_tokens: self.cfg.max_new_tokens,
            sampling: self.sampling(),
            n: group,
            seed: self.cfg.seed,
            stop_ids: self.tok.eos_ids.clone(),
            ignore_eos: false,
        };
        let rows = match self.cfg.rollout_rows {
            0 => HOST_ROLLOUT_ROWS,
            r => r,
        };
        let outs = crate::generate::generate_batch(self.be, &self.model, &requests, &opt, rows)?;
        outs.into_iter()
            .zip(prompts)
            .zip(pos..)
            .map(|((outs, prompt_ids), p)| {
                let completions: Vec<Vec<u32>> = outs
                    .into_iter()
                    .map(|c| c.ids)
                    .filter(|c| !c.is_empty())
                    .collect();
                let texts = completions
                    .iter()
                    .map(|c| self.tok.decode(c, true))
                    .collect::<Result<_>>()?;
                Ok(Group {
                    prompt_ids,
                    completions,
                    texts,
                    gold: ex[p % n].gold.clone(),
                })
            })
            .collect()
    }

    /// The replayed group of record `pos` (wrapping around the file).
    fn replayed_group(&self, pos: usize) -> Result<Group> {
        let n = self.source_len();
        let idx = pos % n;
        match &self.source {
            Source::Rollouts(recs) => match &recs[idx] {
                RolloutRecord::Ids {
                    prompt_ids,
                    completion_ids,
                    gold,
                } => {
                    let texts = completion_ids
                        .iter()
                        .map(|c| self.tok.decode(c, true))
                        .collect::<Result<_>>()?;
                    Ok(Group {
                        prompt_ids: prompt_ids.clone(),
                        completions: completion_ids.clone(),
                        texts,
                        gold: gold.clone(),
                    })
                }
                RolloutRecord::Text {
                    prompt,
                    completions,
                    gold,
                } => {
                    let text = render_prompt(
                        &self.tok,
                        &Prompt::Text(prompt.clone()),
                        self.cfg.prompt_template,
                        &self.cfg.suffix,
                    )?;
                    let completion_ids = completions
                        .iter()
                        .map(|c| self.tok.encode(c))
                        .collect::<Result<_>>()?;
                    Ok(Group {
                        prompt_ids: self.tok.encode(&text)?,
                        completions: completion_ids,
                        texts: completions.clone(),
                        gold: gold.clone(),
                    })
                }
            },
            Source::Supervised(_) => bail!("a supervised data file has no groups to sample"),
            Source::Prompts(_) => bail!("prompts are sampled, not replayed"),
        }
    }

    /// One train step: collect groups, score, filter, and update. Returns its metrics.
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        if self.cfg.algo == Algo::Sft {
            return self.sft_step();
        }
        let t0 = std::time::Instant::now();
        let step = self.state.step;
        let per_step = self
            .cfg
            .prompts_per_step
            .unwrap_or(self.source_len())
            .max(1);
        let mut m = StepMetrics {
            step: step + 1,
            ..Default::default()
        };
        let mut kept: Vec<(Group, Vec<f32>)> = Vec::new();
        let (mut seen, mut se_sum, mut maj_sum, mut gen_tokens) = (0usize, 0.0f64, 0.0f64, 0usize);
        let (mut correct, mut graded, mut reward_sum, mut n_rewards) =
            (0usize, 0usize, 0.0f64, 0usize);
        let t_gen = std::time::Instant::now();
        let replay = matches!(self.source, Source::Rollouts(_));
        let max_groups = if replay || self.cfg.algo == Algo::Em {
            per_step
        } else {
            per_step * (1 + self.cfg.max_refill_rounds)
        };
        // A round samples as many records as could still be kept, all together; since each
        // record keeps at most one group, that is the same records the one-at-a-time loop saw.
        while kept.len() < per_step && seen < max_groups {
            let count = (per_step - kept.len()).min(max_groups - seen);
            let groups = self.make_groups(self.state.data_pos, count, step)?;
            self.state.data_pos += count;
            seen += count;
            for g in groups {
                gen_tokens += g.completions.iter().map(Vec::len).sum::<usize>();
                if g.completions.is_empty() {
                    continue;
                }
                let (rewards, stats, corr) = score_group(self.cfg.algo, &g);
                se_sum += stats.semantic_entropy as f64;
                maj_sum += stats.majority_share as f64;
                for c in corr.iter().flatten() {
                    graded += 1;
                    correct += *c as usize;
                }
                reward_sum += rewards.iter().map(|&r| r as f64).sum::<f64>();
                n_rewards += rewards.len();
                let in_band = rl::entropy_in_band(
                    stats.semantic_entropy,
                    self.cfg.entropy_min,
                    self.cfg.entropy_max,
                );
                if self.cfg.algo == Algo::Em || self.cfg.algo == Algo::Grpo || in_band {
                    let adv = rl::group_advantages(&rewards);
                    kept.push((g, adv));
                }
            }
        }
        let gen_secs = t_gen.elapsed().as_secs_f64();
        m.tokens_per_s = if replay {
            0.0
        } else {
            gen_tokens as f64 / gen_secs.max(1e-9)
        };
        m.semantic_entropy = se_sum / seen.max(1) as f64;
        m.majority_share = maj_sum / seen.max(1) as f64;
        m.kept_fraction = kept.len() as f64 / seen.max(1) as f64;
        m.mean_reward = reward_sum / n_rewards.max(1) as f64;
        m.label_accuracy = (graded > 0).then(|| correct as f64 / graded as f64);
        m.lr = self.opt.cfg.lr;

        let seqs: Vec<TrainSeq> = kept
            .iter()
            .flat_map(|(g, adv)| {
                g.completions
                    .iter()
                    .zip(adv)
                    .filter(|(c, _)| !c.is_empty())
                    .map(|(c, &a)| TrainSeq {
                        ids: g.prompt_ids.iter().chain(c).copied().collect(),
                        prompt_len: g.prompt_ids.len(),
                        advantage: a,
                    })
            })
            .collect();
        m.num_tokens = seqs.iter().map(|s| s.ids.len() - s.prompt_len).sum();
        if seqs.is_empty() {
            eprintln!(
                "step {}: every question was outside the entropy band; no update",
                step + 1
            );
        } else if self.cfg.algo == Algo::Em {
            self.update_em(&seqs, &mut m)?;
        } else {
            self.update_policy(&seqs, &mut m)?;
        }
        self.state.step += 1;
        self.state.optimizer_step = self.opt.step;
        m.seconds = t0.elapsed().as_secs_f64();
        Ok(m)
    }

    /// Supervised step: token-mean cross-entropy of the completions (and the end-of-turn token
    /// after them) over a right-padded batch, one optimizer step.
    fn sft_step(&mut self) -> Result<StepMetrics> {
        let t0 = std::time::Instant::now();
        let Source::Supervised(recs) = &self.source else {
            bail!("sft needs a supervised data file");
        };
        let batch = self
            .cfg
            .prompts_per_step
            .unwrap_or(recs.len())
            .clamp(1, recs.len());
        let end = self
            .tok
            .token_to_id("<|im_end|>")
            .or_else(|| self.tok.eos_ids.first().copied());
        let mut seqs = Vec::with_capacity(batch);
        for i in 0..batch {
            let r = &recs[(self.state.data_pos + i) % recs.len()];
            let text = render_prompt(
                &self.tok,
                &r.prompt,
                self.cfg.prompt_template,
                &self.cfg.suffix,
            )?;
            let prompt = self.tok.encode(&text)?;
            let mut ids = prompt.clone();
            ids.extend(self.tok.encode(&r.completion)?);
            ids.extend(end);
            seqs.push((prompt.len(), ids));
        }
        self.state.data_pos += batch;
        // Right padding keeps the causal attention of the real tokens exact; pads get no target.
        let seq = seqs.iter().map(|s| s.1.len()).max().unwrap_or(1);
        let pad = end.unwrap_or(0);
        let mut ids = vec![pad; batch * seq];
        let mut targets = vec![NO_TARGET; batch * seq];
        for (b, (p, s)) in seqs.iter().enumerate() {
            ids[b * seq..b * seq + s.len()].copy_from_slice(s);
            for t in p - 1..s.len() - 1 {
                targets[b * seq + t] = s[t + 1];
            }
        }
        let n_tok = targets.iter().filter(|&&t| t != NO_TARGET).count();
        let mut acts = self.model.alloc_activations(self.be, batch, seq, true)?;
        self.model.forward_hidden(self.be, &ids, &mut acts)?;
        // Cross-entropy's gradient does not depend on the statistics: b = −1/n per target.
        let per_target = -1.0 / n_tok.max(1) as f32;
        let b = |r: usize, _: &RowStats| {
            let b = if targets[r] == NO_TARGET {
                0.0
            } else {
                per_target
            };
            (0.0, b)
        };
        let mut grads = self.model.zeros_like_params(self.be)?;
        let stats = self.model.lm_head_stats_grad(
            self.be,
            &mut acts,
            &targets,
            1.0,
            Coef::PerRow(&b),
            &mut grads,
        )?;
        let nll = -stats.iter().map(|s| s.logprob as f64).sum::<f64>() / n_tok.max(1) as f64;
        // The memory plan counts activations and offloaded moments' staging as taking turns.
        drop(acts);
        let info = self.opt.step(self.be, &mut self.model.params, &grads)?;
        self.state.step += 1;
        self.state.optimizer_step = self.opt.step;
        let secs = t0.elapsed().as_secs_f64();
        Ok(StepMetrics {
            step: self.state.step,
            loss: nll,
            grad_norm: info.grad_norm,
            lr: info.lr,
            num_tokens: n_tok,
            tokens_per_s: (batch * seq) as f64 / secs.max(1e-9),
            kept_fraction: 1.0,
            seconds: secs,
            ..Default::default()
        })
    }

    /// One-shot EM: the token-mean entropy of every completion token, one optimizer step.
    fn update_em(&mut self, seqs: &[TrainSeq], m: &mut StepMetrics) -> Result<()> {
        let n_tok = m.num_tokens.max(1) as f32;
        let mut grads = self.model.zeros_like_params(self.be)?;
        let mut loss = 0.0f64;
        for s in seqs {
            seq_backward(
                self.be,
                &self.model,
                &mut grads,
                s,
                self.cfg.temperature,
                |ent, lp| {
                    loss += ent.iter().map(|&e| e as f64).sum::<f64>() / n_tok as f64;
                    (vec![1.0 / n_tok; ent.len()], vec![0.0; lp.len()])
                },
            )?;
        }
        let info = self.opt.step(self.be, &mut self.model.params, &grads)?;
        m.loss = loss;
        m.grad_norm = info.grad_norm;
        Ok(())
    }

    /// Clipped policy gradient over `ppo_epochs` × `mini_batches` optimizer steps, with the
    /// log-probs of the weights that sampled the data as the old policy.
    fn update_policy(&mut self, seqs: &[TrainSeq], m: &mut StepMetrics) -> Result<()> {
        let temp = self.cfg.temperature;
        let old: Vec<Vec<f32>> = seqs
            .iter()
            .map(|s| seq_logprobs(self.be, &self.model, s, temp))
            .collect::<Result<_>>()?;
        let refs: Option<Vec<Vec<f32>>> = match &self.reference {
            Some(r) => Some(
                seqs.iter()
                    .map(|s| seq_logprobs(self.be, r, s, temp))
                    .collect::<Result<_>>()?,
            ),
            None => None,
        };
        let beta = self.cfg.kl_coef;
        let clip = ClipConfig {
            kind: self.cfg.policy_loss,
            eps_low: self.cfg.clip_low,
            eps_high: self.cfg.clip_high,
            dual_clip: self.cfg.dual_clip,
            agg: self.cfg.loss_agg,
        };
        let n_mb = self.cfg.mini_batches.clamp(1, seqs.len());
        let (mut loss_sum, mut clip_sum, mut kl_sum, mut norm_sum, mut updates) =
            (0.0, 0.0, 0.0, 0.0, 0usize);
        for _epoch in 0..self.cfg.ppo_epochs.max(1) {
            for mb in 0..n_mb {
                let range = mb * seqs.len() / n_mb..(mb + 1) * seqs.len() / n_mb;
                let total_tokens: usize = seqs[range.clone()]
                    .iter()
                    .map(|s| s.ids.len() - s.prompt_len)
                    .sum();
                let total_seqs = range.len();
                let mut grads = self.model.zeros_like_params(self.be)?;
                let (mut mb_loss, mut mb_clip, mut mb_kl) = (0.0, 0.0, 0.0);
                for i in range {
                    let s = &seqs[i];
                    let span = [SeqSpan {
                        start: 0,
                        len: s.ids.len() - s.prompt_len,
                        advantage: s.advantage,
                    }];
                    seq_backward(self.be, &self.model, &mut grads, s, temp, |ent, lp| {
                        let (st, mut dlp) =
                            rl::policy_loss(lp, &old[i], &span, &clip, total_tokens, total_seqs);
                        mb_loss += st.loss;
                        if let Some(refs) = &refs {
                            let (kl, dkl) = rl::kl_penalty(lp, &refs[i], beta, total_tokens);
                            mb_loss += kl;
                            dlp.iter_mut().zip(dkl).for_each(|(d, k)| *d += k);
                        }
                        mb_clip += st.clip_fraction * lp.len() as f64;
                        mb_kl += st.approx_kl * lp.len() as f64;
                        (vec![0.0; ent.len()], dlp)
                    })?;
                }
                let info = self.opt.step(self.be, &mut self.model.params, &grads)?;
                loss_sum += mb_loss;
                clip_sum += mb_clip / total_tokens.max(1) as f64;
                kl_sum += mb_kl / total_tokens.max(1) as f64;
                norm_sum += info.grad_norm;
                updates += 1;
            }
        }
        let u = updates.max(1) as f64;
        m.loss = loss_sum / u;
        m.clip_fraction = clip_sum / u;
        m.approx_kl = kl_sum / u;
        m.grad_norm = norm_sum / u;
        Ok(())
    }

    /// Saves OUT/<name>/ in Hugging Face layout plus what --resume needs.
    pub fn save(&self, name: &str) -> Result<PathBuf> {
        let state = serde_json::to_vec_pretty(&self.state)?;
        let (be, model) = (self.be, &self.model);
        checkpoint::save_model_dir(
            be,
            model,
            &self.cfg.weights,
            &self.cfg.out.join(name),
            |tmp| {
                std::fs::create_dir_all(tmp.join("resume"))?;
                std::fs::write(tmp.join(RESUME_STATE), &state)?;
                // Full-precision weights and moments: a bf16 checkpoint alone would round away
                // small updates and lose the optimizer, so resuming from it would not continue the
                // same run.
                let f32 = crate::config::DType::F32;
                checkpoint::save_params(be, model, &model.params, f32, None, &tmp.join(MASTER))?;
                self.opt
                    .save_moments(be, model, &tmp.join(MOMENT_M), &tmp.join(MOMENT_V))
            },
        )
    }

    /// Restores weights, optimizer moments and the data position from a checkpoint dir.
    pub fn restore(&mut self, dir: &Path) -> Result<()> {
        let state_path = dir.join(RESUME_STATE);
        let text = std::fs::read_to_string(&state_path)
            .with_context(|| format!("cannot read {}", state_path.display()))?;
        self.state = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a trainer state", state_path.display()))?;
        self.opt.step = self.state.optimizer_step;
        let open = |file: &str| crate::weights::WeightFiles::open_files(&[dir.join(file)]);
        let master = open(MASTER)?;
        let be = self.be;
        for ((name, shape), buf) in crate::model::tensor_specs(&self.model.cfg)
            .iter()
            .zip(self.model.params.list_mut())
        {
            *buf = be.upload(&master.load_f32(name, shape)?)?;
        }
        // Moments go back where the optimizer keeps them (device or host, f32 or bf16).
        if self.opt.moments.is_some() {
            let files = [open(MOMENT_M)?, open(MOMENT_V)?];
            self.opt
                .load_moments(be, &self.model, |file, name, shape| {
                    files[file].load_f32(name, shape)
                })?;
        }
        Ok(())
    }

    /// The whole run: steps, metrics.jsonl, checkpoints, final weights.
    pub fn run(&mut self) -> Result<PathBuf> {
        let out = self.cfg.out.clone();
        std::fs::create_dir_all(&out)
            .with_context(|| format!("cannot create run directory {}", out.display()))?;
        crate::io::write_atomic(
            &out.join("config.json"),
            &serde_json::to_vec_pretty(&self.cfg)?,
        )?;
        let metrics_path = out.join("metrics.jsonl");
        let mut metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .with_context(|| format!("cannot open {}", metrics_path.display()))?;
        let bar = indicatif::ProgressBar::new(self.cfg.steps as u64)
            .with_position(self.state.step as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} step {pos}/{len} | eta {eta} | {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        while self.state.step < self.cfg.steps {
            let mut m = self.train_step()?;
            m.peak_memory_gb = self.be.memory().map(|(_, peak)| peak as f64 / 1e9);
            writeln!(metrics, "{}", serde_json::to_string(&m)?)?;
            metrics.sync_data()?;
            let label = m
                .label_accuracy
                .map(|a| format!(" | label-acc {a:.2}"))
                .unwrap_or_default();
            let summary = if self.cfg.algo == Algo::Sft {
                format!(
                    "loss {:.4} | gnorm {:.3} | {:.0} tok/s",
                    m.loss, m.grad_norm, m.tokens_per_s
                )
            } else {
                format!(
                    "loss {:+.4} | sem-ent {:.3} | maj {:.2} | kept {:.2} | clip {:.3} | gnorm {:.3}{label} | {:.0} tok/s",
                    m.loss, m.semantic_entropy, m.majority_share, m.kept_fraction, m.clip_fraction, m.grad_norm, m.tokens_per_s
                )
            };
            let summary = match m.peak_memory_gb {
                Some(gb) => format!("{summary} | peak {gb:.1} GB"),
                None => summary,
            };
            bar.inc(1);
            if bar.is_hidden() {
                // Off a terminal (logs, CI) one plain line a step.
                eprintln!(
                    "step {}/{} | {summary} | {:.1}s",
                    m.step, self.cfg.steps, m.seconds
                );
            } else {
                bar.set_message(summary);
            }
            if self.cfg.save_every > 0
                && self.state.step.is_multiple_of(self.cfg.save_every)
                && self.state.step < self.cfg.steps
            {
                self.save(&format!("step-{}", self.state.step))?;
            }
        }
        bar.finish();
        self.save("final")
    }
}

/// The newest `step-N` (or `final`) checkpoint of a run directory.
pub fn latest_checkpoint(run_dir: &Path) -> Result<PathBuf> {
    let mut best: Option<(usize, PathBuf)> = None;
    for e in std::fs::read_dir(run_dir)
        .with_context(|| format!("cannot read run directory {}", run_dir.display()))?
    {
        let p = e?.path();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !p.join(RESUME_STATE).exists() {
            continue;
        }
        let rank = if name == "final" {
            usize::MAX
        } else {
            name.strip_prefix("step-")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        if best.as_ref().is_none_or(|(r, _)| rank > *r) {
            best = Some((rank, p));
        }
    }
    best.map(|b| b.1).with_context(|| {
        format!(
            "{}: no checkpoint with {RESUME_STATE} to resume from",
            run_dir.display()
        )
    })
}
