//! Loading prompt files (JSON lines or Parquet) into [`Example`]s.
//!
//! Users bring math prompts in a handful of public layouts (MATH-500 style benchmark
//! rows, OlympiadBench rows, verl chat-format training rows). Both file formats are
//! turned into one `serde_json::Value` per row and go through the same recognizer,
//! [`example_from_json`], so a layout is understood identically whichever format it
//! arrives in.
//!
//! Gold answers are read only so that evaluation can report accuracy; EMPO training
//! is label-free and must never look at them.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use parquet::schema::types::{Type, TypePtr};
use serde_json::{Map, Value};

use crate::grader::{extract_boxed, GoldAnswer};
use crate::tokenizer::ChatMessage;

/// What the model is asked: raw problem text (a chat template is applied later), or
/// a ready-made conversation as in verl-format files.
#[derive(Debug, Clone)]
pub enum Prompt {
    Text(String),
    Chat(Vec<ChatMessage>),
}

#[derive(Debug, Clone)]
pub struct Example {
    /// 0-based position of the row among the file's rows (blank JSONL lines are not rows).
    pub index: usize,
    pub prompt: Prompt,
    /// Reference answer for metrics/evaluation only; never used for training.
    pub gold: Option<GoldAnswer>,
    /// The row's `data_source`, when it has one.
    pub source: Option<String>,
}

/// Fields that can carry a text prompt, in order of preference.
const TEXT_PROMPT_FIELDS: [&str; 3] = ["problem", "question", "prompt"];

/// Every top-level field the recognizer reads. Parquet reads are projected onto these
/// so that unrelated (possibly large) columns are never decoded.
const RECOGNIZED_FIELDS: [&str; 8] = [
    "problem",
    "question",
    "prompt",
    "answer",
    "final_answer",
    "reward_model",
    "solution",
    "data_source",
];

const SUPPORTED: &str = ".jsonl, .ndjson, .json (JSON lines or one JSON array) and .parquet/.pq";

/// Loads every example of a prompt file.
///
/// The format comes from the extension (`.jsonl`, `.ndjson`, `.json`, `.parquet`,
/// `.pq`), except that a file starting with the Parquet magic `PAR1` is read as
/// Parquet whatever its name. A file that yields no examples is an error, since
/// training or evaluating on nothing is never what the caller meant.
pub fn load_examples(path: &Path) -> anyhow::Result<Vec<Example>> {
    let shown = path.display();
    let meta = fs::metadata(path).with_context(|| format!("cannot read prompt file {shown}"))?;
    if meta.is_dir() {
        bail!("{shown}: is a directory, expected a prompt file ({SUPPORTED})");
    }
    let examples = if has_parquet_magic(path)? {
        load_parquet(path)?
    } else {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        match ext.as_str() {
            "jsonl" | "ndjson" | "json" => load_json(path)?,
            // Without the magic this is not Parquet; the reader explains what is wrong.
            "parquet" | "pq" => load_parquet(path)?,
            "" => bail!("{shown}: no file extension; supported formats: {SUPPORTED}"),
            other => {
                bail!("{shown}: unsupported extension `.{other}`; supported formats: {SUPPORTED}")
            }
        }
    };
    if examples.is_empty() {
        bail!("{shown}: no examples (the file is empty)");
    }
    Ok(examples)
}

/// Recognizes one row. The returned example has `index` 0; loaders set the real one.
///
/// Prompt: a `prompt` list of `{role, content}` messages (verl layout) becomes
/// [`Prompt::Chat`]; otherwise the first non-null of `problem`, `question`, `prompt`
/// must be a non-empty string and becomes [`Prompt::Text`].
///
/// Gold, first found wins: `answer`, `final_answer` (math `$` delimiters removed),
/// `reward_model.ground_truth`, last `\boxed{}` of `solution`. For chat rows
/// `reward_model.ground_truth` comes first, because that is what verl grades against.
pub fn example_from_json(row: &Value) -> Result<Example, String> {
    let obj = row
        .as_object()
        .ok_or_else(|| format!("expected a JSON object, found {}", kind(row)))?;
    let prompt = prompt_from(obj)?;
    let gold = gold_from(obj, matches!(prompt, Prompt::Chat(_)))?;
    let source = obj
        .get("data_source")
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
        .map(str::to_owned);
    Ok(Example {
        index: 0,
        prompt,
        gold,
        source,
    })
}

fn prompt_from(obj: &Map<String, Value>) -> Result<Prompt, String> {
    // A message list is the verl layout's defining trait, so it wins even if the row
    // also keeps the raw `problem` text: the list is what the recipe actually feeds.
    if let Some(Value::Array(messages)) = obj.get("prompt") {
        return chat_from(messages).map(Prompt::Chat);
    }
    for field in TEXT_PROMPT_FIELDS {
        match obj.get(field) {
            // Parquet has no "absent": a missing optional value arrives as null.
            None | Some(Value::Null) => continue,
            Some(Value::String(s)) if s.trim().is_empty() => {
                return Err(format!("empty prompt in field `{field}`"))
            }
            Some(Value::String(s)) => return Ok(Prompt::Text(s.clone())),
            Some(other) => {
                let expected = if field == "prompt" {
                    "a string or a list of {role, content} messages"
                } else {
                    "a string"
                };
                return Err(format!(
                    "field `{field}` is {}, expected {expected}",
                    kind(other)
                ));
            }
        }
    }
    let mut found: Vec<&str> = obj.keys().map(String::as_str).take(12).collect();
    if obj.len() > found.len() {
        found.push("...");
    }
    Err(format!(
        "no prompt: expected a string field `problem`, `question` or `prompt`, \
         or a `prompt` list of {{role, content}} messages (fields present: {})",
        if found.is_empty() {
            "none".to_string()
        } else {
            found.join(", ")
        }
    ))
}

fn chat_from(messages: &[Value]) -> Result<Vec<ChatMessage>, String> {
    if messages.is_empty() {
        return Err("empty prompt: `prompt` is an empty message list".into());
    }
    let mut chat = Vec::with_capacity(messages.len());
    for (i, message) in messages.iter().enumerate() {
        let text_of = |key: &str| message.get(key).and_then(Value::as_str);
        let role = text_of("role").filter(|r| !r.trim().is_empty());
        let content = text_of("content");
        let (Some(role), Some(content)) = (role, content) else {
            return Err(format!(
                "`prompt` message {i} must be an object with string `role` and `content`, found {}",
                compact(message)
            ));
        };
        chat.push(ChatMessage {
            role: role.to_owned(),
            content: content.to_owned(),
        });
    }
    if chat.iter().all(|m| m.content.trim().is_empty()) {
        return Err("empty prompt: every message in `prompt` has empty content".into());
    }
    Ok(chat)
}

#[derive(Clone, Copy)]
enum GoldField {
    Answer,
    FinalAnswer,
    GroundTruth,
    Solution,
}

fn gold_from(obj: &Map<String, Value>, chat: bool) -> Result<Option<GoldAnswer>, String> {
    use GoldField::*;
    let order = if chat {
        [GroundTruth, Answer, FinalAnswer, Solution]
    } else {
        [Answer, FinalAnswer, GroundTruth, Solution]
    };
    for field in order {
        let gold = match field {
            Answer => answer_value(obj.get("answer"), "answer", false)?,
            FinalAnswer => answer_value(obj.get("final_answer"), "final_answer", true)?,
            GroundTruth => answer_value(
                obj.get("reward_model").and_then(|r| r.get("ground_truth")),
                "reward_model.ground_truth",
                false,
            )?,
            Solution => boxed_in_solution(obj.get("solution")),
        };
        if gold.is_some() {
            return Ok(gold);
        }
    }
    Ok(None)
}

/// Reads an explicit answer field. Null, blank and empty-list values count as absent so
/// that the next field in the precedence order gets its turn; a value of a type no
/// answer can have is an error rather than a silently missing gold.
fn answer_value(
    value: Option<&Value>,
    field: &str,
    strip_math: bool,
) -> Result<Option<GoldAnswer>, String> {
    let text = |s: &str| {
        let s = if strip_math {
            strip_math_dollars(s)
        } else {
            s.to_owned()
        };
        (!s.trim().is_empty()).then_some(s)
    };
    let bad = |v: &Value| {
        format!(
            "field `{field}` is {}, expected a string, a number or a list of them",
            kind(v)
        )
    };
    Ok(match value {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => text(s).map(GoldAnswer::Text),
        Some(Value::Number(n)) => n.as_f64().map(GoldAnswer::Number),
        Some(Value::Array(items)) => {
            let mut list = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::String(s) => list.extend(text(s)),
                    Value::Number(n) => list.push(n.to_string()),
                    Value::Null => {}
                    other => return Err(bad(other)),
                }
            }
            (!list.is_empty()).then_some(GoldAnswer::List(list))
        }
        Some(other) => return Err(bad(other)),
    })
}

/// OlympiadBench wraps answers in math mode, sometimes several spans in one element
/// (`$69$,$84$`), so stripping only the outer pair would leave stray delimiters;
/// every unescaped `$` goes, while `\$` (a literal dollar sign) stays.
fn strip_math_dollars(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut escaped = false;
    for c in s.chars() {
        if c != '$' || escaped {
            out.push(c);
        }
        escaped = c == '\\' && !escaped;
    }
    out.trim().to_owned()
}

/// Solutions are free text, so anything unusable here just means "no gold".
fn boxed_in_solution(value: Option<&Value>) -> Option<GoldAnswer> {
    let text = match value? {
        Value::String(s) => s.as_str(),
        Value::Array(items) => items.iter().find_map(Value::as_str)?,
        _ => return None,
    };
    extract_boxed(text)
        .filter(|b| !b.trim().is_empty())
        .map(GoldAnswer::Text)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Short rendering of a value for error messages; prompts can be kilobytes long.
fn compact(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(80) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s,
    }
}

fn has_parquet_magic(path: &Path) -> anyhow::Result<bool> {
    use std::io::Read;
    let mut head = [0u8; 4];
    let mut file =
        fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut filled = 0;
    while filled < head.len() {
        match file.read(&mut head[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }
    Ok(filled == head.len() && &head == b"PAR1")
}

fn load_json(path: &Path) -> anyhow::Result<Vec<Example>> {
    let shown = path.display();
    let bytes = fs::read(path).with_context(|| format!("cannot read {shown}"))?;
    // Editors on Windows like to prepend a BOM; it is not part of the first row.
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);

    // `.json` exports are often one array of rows rather than JSON lines.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        let rows: Vec<Value> = serde_json::from_slice(bytes).map_err(|e| {
            anyhow!(
                "{shown}:{}:{}: invalid JSON: {}",
                e.line(),
                e.column(),
                without_position(&e)
            )
        })?;
        return rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let mut example =
                    example_from_json(row).map_err(|e| anyhow!("{shown}: row {i}: {e}"))?;
                example.index = i;
                Ok(example)
            })
            .collect();
    }

    let mut examples = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let lineno = i + 1;
        let line = std::str::from_utf8(line)
            .map_err(|e| anyhow!("{shown}:{lineno}: not valid UTF-8: {e}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let row: Value = serde_json::from_str(line).map_err(|e| {
            anyhow!(
                "{shown}:{lineno}: invalid JSON at column {}: {}",
                e.column(),
                without_position(&e)
            )
        })?;
        let mut example = example_from_json(&row).map_err(|e| anyhow!("{shown}:{lineno}: {e}"))?;
        example.index = examples.len();
        examples.push(example);
    }
    Ok(examples)
}

/// serde_json appends "at line L column C"; the caller reports the position itself.
fn without_position(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    full.strip_suffix(&suffix).unwrap_or(&full).to_owned()
}

fn load_parquet(path: &Path) -> anyhow::Result<Vec<Example>> {
    // The parquet crate has had panics on malformed input; a bad user file must still
    // surface as an error naming the file, not bring the whole run down.
    // The default hook would print the panic and a backtrace hint before our error; the
    // user should see one clear message.
    let previous = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| read_parquet(path)));
    panic::set_hook(previous);
    match outcome {
        Ok(result) => result,
        Err(payload) => {
            let why = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("unknown cause");
            bail!(
                "{}: corrupt parquet file (decoder panicked: {why})",
                path.display()
            )
        }
    }
}

fn read_parquet(path: &Path) -> anyhow::Result<Vec<Example>> {
    let shown = path.display();
    let file = fs::File::open(path).with_context(|| format!("cannot open {shown}"))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| anyhow!("{shown}: not a readable parquet file: {e}"))?;
    let metadata = reader.metadata();
    let schema = metadata.file_metadata().schema();

    let columns: Vec<TypePtr> = schema
        .get_fields()
        .iter()
        .filter(|f| RECOGNIZED_FIELDS.contains(&f.name()))
        .cloned()
        .collect();
    if !columns
        .iter()
        .any(|c| TEXT_PROMPT_FIELDS.contains(&c.name()))
    {
        let present: Vec<&str> = schema.get_fields().iter().map(|f| f.name()).collect();
        bail!(
            "{shown}: no prompt column (expected `problem`, `question` or `prompt`); columns: {}",
            present.join(", ")
        );
    }
    let projection = Type::group_type_builder(schema.name())
        .with_fields(columns)
        .build()
        .map_err(|e| anyhow!("{shown}: cannot select columns: {e}"))?;

    let rows = reader
        .get_row_iter(Some(projection))
        .map_err(|e| anyhow!("{shown}: cannot read rows: {e}"))?;
    let expected = usize::try_from(metadata.file_metadata().num_rows()).unwrap_or(0);
    let mut examples = Vec::with_capacity(expected);
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| anyhow!("{shown}: row {i}: corrupt parquet data: {e}"))?;
        let mut example =
            example_from_json(&row_to_json(&row)).map_err(|e| anyhow!("{shown}: row {i}: {e}"))?;
        example.index = i;
        examples.push(example);
    }
    Ok(examples)
}

fn row_to_json(row: &Row) -> Value {
    Value::Object(
        row.get_column_iter()
            .map(|(name, field)| (name.clone(), field_to_json(field)))
            .collect(),
    )
}

/// Our own conversion rather than parquet's `Row::to_json_value` (behind its `json`
/// feature): that one base64-encodes BYTE_ARRAY columns lacking a UTF-8 annotation,
/// which some writers emit for plain text, and it needs the extra `base64` crate.
fn field_to_json(field: &Field) -> Value {
    let float = |x: f64| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
    match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(n) => Value::from(*n),
        Field::Short(n) => Value::from(*n),
        Field::Int(n) => Value::from(*n),
        Field::Long(n) => Value::from(*n),
        Field::UByte(n) => Value::from(*n),
        Field::UShort(n) => Value::from(*n),
        Field::UInt(n) => Value::from(*n),
        Field::ULong(n) => Value::from(*n),
        Field::Float(x) => float(f64::from(*x)),
        Field::Double(x) => float(*x),
        // Going through Display avoids depending on the `half` crate for f16.
        Field::Float16(_) => field.to_string().parse().map_or(Value::Null, float),
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(b) => Value::String(String::from_utf8_lossy(b.data()).into_owned()),
        Field::Group(row) => row_to_json(row),
        Field::ListInternal(list) => {
            Value::Array(list.elements().iter().map(field_to_json).collect())
        }
        Field::MapInternal(map) => Value::Object(
            map.entries()
                .iter()
                .map(|(k, v)| {
                    let key = match field_to_json(k) {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (key, field_to_json(v))
                })
                .collect(),
        ),
        // Decimals, dates and timestamps never hold a prompt or an answer we could
        // grade numerically; their display form is enough.
        Field::Decimal(_)
        | Field::Date(_)
        | Field::TimeMillis(_)
        | Field::TimeMicros(_)
        | Field::TimestampMillis(_)
        | Field::TimestampMicros(_) => Value::String(field.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::PathBuf;

    // ---------- recognizer ----------

    fn text(p: &Prompt) -> &str {
        match p {
            Prompt::Text(t) => t,
            Prompt::Chat(c) => panic!("expected a text prompt, got chat {c:?}"),
        }
    }

    fn chat(p: &Prompt) -> &[ChatMessage] {
        match p {
            Prompt::Chat(c) => c,
            Prompt::Text(t) => panic!("expected a chat prompt, got text {t:?}"),
        }
    }

    #[test]
    fn text_prompt_fields_in_order() {
        let ex = example_from_json(&json!({"question": "Q", "problem": "P"})).unwrap();
        assert_eq!(text(&ex.prompt), "P");
        let ex = example_from_json(&json!({"question": "Q", "prompt": "R"})).unwrap();
        assert_eq!(text(&ex.prompt), "Q");
        let ex = example_from_json(&json!({"prompt": "R"})).unwrap();
        assert_eq!(text(&ex.prompt), "R");
        // A null (how parquet reports a missing value) falls through to the next field.
        let ex = example_from_json(&json!({"problem": null, "question": "Q"})).unwrap();
        assert_eq!(text(&ex.prompt), "Q");
        assert_eq!(ex.gold, None);
        assert_eq!(ex.source, None);
    }

    #[test]
    fn verl_chat_prompt_and_ground_truth() {
        let row = json!({
            "data_source": "numina_math",
            "problem": "raw text",
            "prompt": [{"role": "system", "content": "be brief"},
                       {"role": "user", "content": "1+1?"}],
            "answer": "ignored for chat rows",
            "reward_model": {"ground_truth": ["2"], "style": "rule"}
        });
        let ex = example_from_json(&row).unwrap();
        let msgs = chat(&ex.prompt);
        assert_eq!(msgs.len(), 2);
        assert_eq!(
            (msgs[1].role.as_str(), msgs[1].content.as_str()),
            ("user", "1+1?")
        );
        assert_eq!(ex.gold, Some(GoldAnswer::List(vec!["2".into()])));
        assert_eq!(ex.source.as_deref(), Some("numina_math"));

        let gt = |v: Value| {
            example_from_json(&json!({"prompt": [{"role": "user", "content": "x"}],
                                      "reward_model": {"ground_truth": v}}))
            .unwrap()
            .gold
        };
        assert_eq!(gt(json!("12.8")), Some(GoldAnswer::Text("12.8".into())));
        assert_eq!(gt(json!(7)), Some(GoldAnswer::Number(7.0)));
        assert_eq!(gt(json!(null)), None);
    }

    #[test]
    fn gold_precedence_for_plain_rows() {
        let gold = |v: Value| example_from_json(&v).unwrap().gold;
        let all = json!({"problem": "p", "answer": "A", "final_answer": ["$F$"],
                         "reward_model": {"ground_truth": "G"}, "solution": "\\boxed{S}"});
        assert_eq!(gold(all), Some(GoldAnswer::Text("A".into())));
        assert_eq!(
            gold(json!({"problem": "p", "answer": 27.0})),
            Some(GoldAnswer::Number(27.0))
        );
        assert_eq!(
            gold(json!({"problem": "p", "answer": ["1", 2]})),
            Some(GoldAnswer::List(vec!["1".into(), "2".into()]))
        );
        // A blank answer is no answer: the next source is used.
        assert_eq!(
            gold(
                json!({"problem": "p", "answer": " ", "final_answer": ["$12$"], "solution": "\\boxed{S}"})
            ),
            Some(GoldAnswer::List(vec!["12".into()]))
        );
        assert_eq!(
            gold(
                json!({"problem": "p", "reward_model": {"ground_truth": "G"}, "solution": "\\boxed{S}"})
            ),
            Some(GoldAnswer::Text("G".into()))
        );
        assert_eq!(
            gold(json!({"problem": "p", "solution": "so \\boxed{1} then \\boxed{\\frac{1}{2}}."})),
            Some(GoldAnswer::Text("\\frac{1}{2}".into()))
        );
        assert_eq!(
            gold(json!({"question": "p", "solution": ["x = \\boxed{3}", "\\boxed{4}"]})),
            Some(GoldAnswer::Text("3".into()))
        );
        assert_eq!(gold(json!({"problem": "p", "solution": "no box"})), None);
    }

    #[test]
    fn final_answer_loses_math_delimiters_only() {
        assert_eq!(strip_math_dollars("$12$"), "12");
        assert_eq!(strip_math_dollars(" $69$,$84$ "), "69,84");
        assert_eq!(strip_math_dollars("$f(n)=n$, $g(n)=1$"), "f(n)=n, g(n)=1");
        assert_eq!(strip_math_dollars("\\$5"), "\\$5");
        assert_eq!(strip_math_dollars("$$x$$"), "x");
        assert_eq!(strip_math_dollars("plain"), "plain");
    }

    #[test]
    fn recognizer_errors_are_specific() {
        let err = |v: Value| example_from_json(&v).unwrap_err();
        let e = err(json!({"text": "hi", "answer": "1"}));
        assert!(e.starts_with("no prompt"), "{e}");
        assert!(
            e.contains("text") && e.contains("answer"),
            "lists the fields present: {e}"
        );
        assert!(err(json!({"problem": "  "})).contains("empty prompt"));
        assert!(err(json!({"problem": 5})).contains("`problem` is a number"));
        assert!(err(json!({"prompt": []})).contains("empty prompt"));
        assert!(err(json!({"prompt": [{"role": "user", "content": ""}]})).contains("empty prompt"));
        assert!(err(json!({"prompt": [{"role": "user"}]})).contains("message 0"));
        assert!(
            err(json!({"prompt": [{"role": "user", "content": "x"}, "hi"]})).contains("message 1")
        );
        assert!(err(json!({"prompt": [{"content": "x"}]})).contains("`role`"));
        assert!(err(json!(["problem"])).contains("expected a JSON object"));
        assert!(err(json!({"problem": "p", "answer": {"x": 1}})).contains("`answer` is an object"));
    }

    // ---------- files ----------

    /// The shared data lives beside the project (`../shared` from the crate root).
    fn data_file(rel: &str) -> PathBuf {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data")
            .join(rel);
        assert!(p.exists(), "missing shared data file {}", p.display());
        p
    }

    fn load(rel: &str) -> Vec<Example> {
        load_examples(&data_file(rel)).unwrap_or_else(|e| panic!("{rel}: {e:#}"))
    }

    fn assert_indexed(examples: &[Example]) {
        assert!(examples.iter().enumerate().all(|(i, e)| e.index == i));
    }

    #[test]
    fn math500() {
        let ex = load("benchmarks/math500.jsonl");
        assert_eq!(ex.len(), 500);
        assert_indexed(&ex);
        assert!(text(&ex[0].prompt).starts_with(
            "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates."
        ));
        assert_eq!(
            ex[0].gold,
            Some(GoldAnswer::Text(
                "\\left( 3, \\frac{\\pi}{2} \\right)".into()
            ))
        );
        assert!(ex
            .iter()
            .all(|e| matches!(e.gold, Some(GoldAnswer::Text(_)))));
    }

    #[test]
    fn minerva_gold_comes_from_boxed_solution() {
        let ex = load("benchmarks/minerva_math.jsonl");
        assert_eq!(ex.len(), 272);
        assert!(text(&ex[0].prompt).starts_with(
            "Each of the two Magellan telescopes has a diameter of $6.5 \\mathrm{~m}$."
        ));
        assert_eq!(ex[0].gold, Some(GoldAnswer::Text("1.6".into())));
        assert_eq!(ex[271].gold, Some(GoldAnswer::Text("10.1".into())));
    }

    #[test]
    fn olympiadbench() {
        let ex = load("benchmarks/olympiadbench.jsonl");
        assert_eq!(ex.len(), 675);
        assert!(text(&ex[0].prompt).starts_with("Xenia and Sergey play the following game."));
        assert_eq!(ex[0].gold, Some(GoldAnswer::List(vec!["2".into()])));
        // Row 1 (id 1610) is the first whose answer is wrapped in `$...$`.
        assert!(text(&ex[1].prompt)
            .starts_with("Given a positive integer $n$, determine the largest real num"));
        assert_eq!(
            ex[1].gold,
            Some(GoldAnswer::List(vec!["\\frac{1}{2 n+2}".into()]))
        );
        let with_dollar = ex.iter().filter(|e| match &e.gold {
            Some(GoldAnswer::List(l)) => l.iter().any(|a| a.contains('$')),
            _ => true,
        });
        assert_eq!(with_dollar.count(), 0);
    }

    #[test]
    fn aime24() {
        let ex = load("benchmarks/aime24.jsonl");
        assert_eq!(ex.len(), 30);
        assert!(
            text(&ex[0].prompt).starts_with("Every morning Aya goes for a $9$-kilometer-long walk")
        );
        assert_eq!(ex[0].gold, Some(GoldAnswer::Text("204".into())));
    }

    #[test]
    fn amc23_numeric_answers() {
        let ex = load("benchmarks/amc23.jsonl");
        assert_eq!(ex.len(), 40);
        assert!(text(&ex[0].prompt).starts_with("Cities $A$ and $B$ are $45$ miles apart."));
        assert_eq!(ex[0].gold, Some(GoldAnswer::Number(27.0)));
        assert!(ex
            .iter()
            .all(|e| matches!(e.gold, Some(GoldAnswer::Number(_)))));
    }

    #[test]
    fn math500_verl_jsonl() {
        let ex = load("train/math500_verl_format.jsonl");
        assert_eq!(ex.len(), 500);
        let msgs = chat(&ex[0].prompt);
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].role, "user");
        assert!(msgs[0].content.starts_with("Convert the point $(0,3)$"));
        assert!(msgs[0]
            .content
            .ends_with("Let's think step by step and output the final answer within \\boxed{}."));
        assert_eq!(
            ex[0].gold,
            Some(GoldAnswer::List(vec![
                "\\left( 3, \\frac{\\pi}{2} \\right)".into()
            ]))
        );
        assert_eq!(ex[0].source.as_deref(), Some("math500"));
        assert_eq!(
            ex[499].gold,
            Some(GoldAnswer::List(vec!["106^\\circ".into()]))
        );
    }

    #[test]
    fn numina_parquet_nested_columns() {
        let ex = load("train/numina_20k_prompts.parquet");
        assert_eq!(ex.len(), 20_000);
        assert_indexed(&ex);
        for e in &ex {
            let msgs = chat(&e.prompt);
            assert_eq!(msgs.len(), 1);
            assert_eq!(msgs[0].role, "user");
            assert_eq!(e.source.as_deref(), Some("numina_math"));
            assert!(matches!(&e.gold, Some(GoldAnswer::List(l)) if l.len() == 1));
        }
        let first = &chat(&ex[0].prompt)[0].content;
        assert!(first
            .starts_with("In the arithmetic sequence ${a_n}$, it is known that $a_5 + a_7 = 10$"));
        assert!(first.ends_with("output the final answer within \\boxed{}."));
        assert_eq!(ex[0].gold, Some(GoldAnswer::List(vec!["55".into()])));
        assert!(chat(&ex[19_999].prompt)[0]
            .content
            .starts_with("What is the least five-digit whole number that is both a perfect squar"));
        assert_eq!(
            ex[19_999].gold,
            Some(GoldAnswer::List(vec!["15625".into()]))
        );
    }

    #[test]
    fn one_shot_parquet() {
        let ex = load("train/one_shot_pi1_r128.parquet");
        assert_eq!(ex.len(), 128);
        assert_indexed(&ex);
        for e in &ex {
            assert!(text(&e.prompt)
                .starts_with("The pressure \\( P \\) exerted by wind on a sail varies jointly"));
            assert_eq!(e.gold, Some(GoldAnswer::Text("12.8".into())));
            assert_eq!(e.source.as_deref(), Some("deepscaler"));
        }
    }

    // ---------- malformed input ----------

    /// A fresh directory under the system temp dir, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("empo-data-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
        fn file(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
            let p = self.0.join(name);
            fs::write(&p, contents).unwrap();
            p
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn load_err(path: &Path) -> String {
        match load_examples(path) {
            Ok(ex) => panic!(
                "{} loaded {} examples, expected an error",
                path.display(),
                ex.len()
            ),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn jsonl_errors_name_file_and_line() {
        let dir = Scratch::new("jsonl");
        let ok = r#"{"problem": "1+1?", "answer": "2"}"#;

        let p = dir.file(
            "bad.jsonl",
            format!("{ok}\n\n{{\"problem\": \"x\",\n{ok}\n"),
        );
        let e = load_err(&p);
        assert!(e.starts_with(&format!("{}:3:", p.display())), "{e}");
        assert!(e.contains("invalid JSON"), "{e}");

        let p = dir.file("noprompt.jsonl", format!("{ok}\n{{\"text\": \"x\"}}\n"));
        let e = load_err(&p);
        assert!(
            e.starts_with(&format!("{}:2: no prompt", p.display())),
            "{e}"
        );

        let p = dir.file("blank.jsonl", format!("{ok}\n{{\"problem\": \"\"}}\n"));
        assert!(load_err(&p).contains(":2: empty prompt"));

        let p = dir.file(
            "msgs.jsonl",
            "{\"prompt\": [{\"role\": \"user\", \"text\": \"x\"}]}\n",
        );
        let e = load_err(&p);
        assert!(
            e.contains(":1: `prompt` message 0 must be an object"),
            "{e}"
        );

        let p = dir.file("latin1.jsonl", b"{\"problem\": \"caf\xe9\"}\n");
        assert!(load_err(&p).contains(":1: not valid UTF-8"));
    }

    #[test]
    fn blank_lines_crlf_and_bom_are_tolerated() {
        let dir = Scratch::new("lenient");
        let p = dir.file(
            "rows.jsonl",
            "\u{feff}{\"problem\": \"a\"}\r\n\r\n  \n{\"question\": \"b\", \"answer\": 3}\r\n",
        );
        let ex = load_examples(&p).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!((ex[1].index, text(&ex[1].prompt)), (1, "b"));
        assert_eq!(ex[1].gold, Some(GoldAnswer::Number(3.0)));
    }

    #[test]
    fn json_array_files() {
        let dir = Scratch::new("array");
        let p = dir.file(
            "rows.json",
            "[\n {\"problem\": \"a\"},\n {\"problem\": \"b\"}\n]\n",
        );
        let ex = load_examples(&p).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(text(&ex[1].prompt), "b");
        let p = dir.file(
            "bad.json",
            "[\n {\"problem\": \"a\"},\n {\"answer\": \"b\"}\n]\n",
        );
        assert!(load_err(&p).contains("bad.json: row 1: no prompt"));
    }

    #[test]
    fn empty_missing_and_unknown_files() {
        let dir = Scratch::new("files");
        for (name, body) in [
            ("empty.jsonl", ""),
            ("blank.jsonl", "\n \n"),
            ("empty.json", "[]"),
        ] {
            let p = dir.file(name, body);
            let e = load_err(&p);
            assert!(
                e.contains(&p.display().to_string()) && e.contains("no examples"),
                "{e}"
            );
        }

        let missing = dir.0.join("nope.jsonl");
        let e = load_err(&missing);
        assert!(e.contains(&missing.display().to_string()), "{e}");

        let p = dir.file("rows.csv", "problem\n1+1\n");
        let e = load_err(&p);
        assert!(
            e.contains("unsupported extension `.csv`") && e.contains(".jsonl"),
            "{e}"
        );

        assert!(load_err(&dir.0).contains("is a directory"));
    }

    #[test]
    fn parquet_is_sniffed_by_magic() {
        let dir = Scratch::new("sniff");
        let bytes = fs::read(data_file("train/one_shot_pi1_r128.parquet")).unwrap();
        let p = dir.file("one_shot.bin", &bytes);
        assert_eq!(load_examples(&p).unwrap().len(), 128);
    }

    #[test]
    fn broken_parquet_is_an_error_naming_the_file() {
        let dir = Scratch::new("parquet");
        let bytes = fs::read(data_file("train/one_shot_pi1_r128.parquet")).unwrap();
        let p = dir.file("half.parquet", &bytes[..bytes.len() / 2]);
        let e = load_err(&p);
        assert!(e.contains(&p.display().to_string()), "{e}");

        let p = dir.file("fake.parquet", "{\"problem\": \"x\"}\n");
        let e = load_err(&p);
        assert!(
            e.contains("fake.parquet: not a readable parquet file"),
            "{e}"
        );

        // parquet 59 panics on this one ("Cannot extract value, max definition level").
        let mut poked = bytes.clone();
        assert_eq!(
            poked[88], 0x01,
            "test relies on the shared file's exact bytes"
        );
        poked[88] = 0xff;
        let p = dir.file("poked.parquet", &poked);
        let e = load_err(&p);
        assert!(e.contains(&p.display().to_string()), "{e}");

        // Damage inside the data pages while keeping the footer intact.
        let mut damaged = fs::read(data_file("train/numina_20k_prompts.parquet")).unwrap();
        for b in &mut damaged[1000..200_000] {
            *b = b.wrapping_mul(31).wrapping_add(7);
        }
        let p = dir.file("damaged.parquet", &damaged);
        let e = load_err(&p);
        assert!(e.contains(&p.display().to_string()), "{e}");
    }
}
