//! Math answer grading without labels in the loop: pull the final answer out of a
//! completion, reduce it to a canonical string (used to cluster sampled answers for
//! semantic entropy), and decide whether two answers are mathematically equivalent
//! (used for evaluation against benchmark golds).
//!
//! Everything here is written to be safe on adversarial model output: no panics,
//! no unbounded recursion, and every comparison does a bounded amount of work.

use regex::Regex;
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::OnceLock;

/// Answers longer than this (in bytes) are compared only by normalized string:
/// real final answers are short, and long ones are almost always rambling text.
const MAX_EQUIV_LEN: usize = 1000;
/// Inputs longer than this get only whitespace removal: no real final answer is
/// this long, and the brace-matching rewrites are quadratic on adversarial input
/// (thousands of unclosed `\text{`), so they must only see short strings.
const MAX_NORMALIZE_LEN: usize = 2000;
/// Nested structure (list of tuples of sets ...) deeper than this is not compared.
const MAX_STRUCT_DEPTH: usize = 4;
/// Lists/tuples/sets with more items than this are compared only as strings.
const MAX_LIST_ITEMS: usize = 32;
/// Total number of sub-comparisons one `is_equiv` call may perform.
const WORK_BUDGET: u32 = 2000;
/// Expression size and nesting limits for the parser.
const MAX_TOKENS: usize = 400;
const MAX_PARSE_DEPTH: usize = 100;
/// Brace nesting limit for the recursive string rewriters.
const MAX_REWRITE_DEPTH: usize = 16;
/// More free variables than this is not a final answer we can test by sampling.
const MAX_VARS: usize = 8;
const NUMERIC_REL_TOL: f64 = 1e-4;
const SYMBOLIC_REL_TOL: f64 = 1e-6;
/// Sampling points for the symbolic check: real points catch almost all
/// differences; integer points make integer-only functions (binom, !) testable.
const REAL_POINTS: usize = 6;
const INT_POINTS: usize = 4;
const MIN_VALID_POINTS: usize = 3;

macro_rules! regex {
    ($re:literal) => {{
        static RE: OnceLock<Regex> = OnceLock::new();
        RE.get_or_init(|| Regex::new($re).expect("hard-coded regex is valid"))
    }};
}

// ---------------------------------------------------------------------------
// Extraction
// ---------------------------------------------------------------------------

/// Last \boxed{...} or \fbox{...} content with brace matching (handles nested braces, `\boxed 5` without braces too).
///
/// Only the last box counts: if it is unclosed (a truncated generation) the result
/// is `None` rather than an earlier, superseded answer.
pub fn extract_boxed(text: &str) -> Option<String> {
    // One forward scan for markers keeps this linear even for text full of
    // `\boxedfoo` look-alikes.
    let markers: Vec<usize> = regex!(r"\\(?:boxed|fbox)")
        .find_iter(text)
        .map(|m| m.end())
        .collect();
    for &after in markers.iter().rev() {
        let rest = &text[after..];
        // `\boxedfoo` is some other control word, not a box.
        if rest.starts_with(|c: char| c.is_ascii_alphabetic()) {
            continue;
        }
        let trimmed = rest.trim_start();
        if let Some(inner) = trimmed.strip_prefix('{') {
            let close = matching_brace(inner)?;
            return Some(inner[..close].to_string());
        }
        // TeX would box a single token, but models write `\boxed 42`; take the word.
        let word: String = trimmed
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != '$')
            .collect();
        return if word.is_empty() { None } else { Some(word) };
    }
    None
}

/// Byte index of the `}` closing a group whose `{` was just before `s`.
/// Escaped braces (`\{`, `\}`) do not count.
fn matching_brace(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '{' => depth += 1,
            '}' => {
                if depth == 0 {
                    return Some(i);
                }
                depth -= 1;
            }
            _ => {}
        }
    }
    None
}

/// For evaluation: boxed first, then "the answer is ...", then "#### ...", then the last number in the text.
pub fn extract_answer_eval(text: &str) -> Option<String> {
    if let Some(b) = extract_boxed(text) {
        if !b.trim().is_empty() {
            return Some(b);
        }
    }
    let phrase = regex!(r"(?i)the\s+(?:final\s+)?answer\s+is\s*:?\s*");
    if let Some(m) = phrase.find_iter(text).last() {
        let ans = answer_after_phrase(&text[m.end()..]);
        if !ans.is_empty() {
            return Some(ans);
        }
    }
    if let Some(pos) = text.rfind("####") {
        let line = text[pos + 4..].lines().next().unwrap_or("");
        let ans = trim_sentence_end(line);
        if !ans.is_empty() {
            return Some(ans);
        }
    }
    let number = regex!(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+");
    number
        .find_iter(text)
        .last()
        .map(|m| m.as_str().to_string())
}

/// The answer right after "the answer is": a `$...$` span if it starts with one,
/// otherwise the rest of the sentence.
fn answer_after_phrase(tail: &str) -> String {
    let tail = tail.trim_start();
    if let Some(math) = tail.strip_prefix('$') {
        let math = math.trim_start_matches('$');
        if let Some(end) = math.find('$') {
            return trim_sentence_end(&math[..end]);
        }
    }
    let line = tail.lines().next().unwrap_or("");
    // A period followed by a space ends the sentence; a decimal point does not.
    let sentence = match line.find(". ") {
        Some(i) => &line[..i],
        None => line,
    };
    trim_sentence_end(sentence)
}

fn trim_sentence_end(s: &str) -> String {
    s.trim()
        .trim_end_matches(['.', '$', ' '])
        .trim_start_matches(['$', ' '])
        .trim()
        .to_string()
}

// ---------------------------------------------------------------------------
// Normalization
// ---------------------------------------------------------------------------

/// Canonical string form used for clustering/equality: strips \left \right, spaces, \$, \%, degrees (^\circ, ^{\circ}, °), \text{...} units / \text{} wrappers, \mbox, \! \, \; \: spacing, trailing period, dfrac/tfrac->frac, \frac12 -> \frac{1}{2}, `\frac{a}{b}` kept, short `x=` / `k =` prefixes removed, leading/trailing `$`, etc.
pub fn normalize_answer(s: &str) -> String {
    if s.len() > MAX_NORMALIZE_LEN {
        return s.chars().filter(|c| !c.is_whitespace()).collect();
    }
    // `1{,}000` is how TeX users write a thousands separator.
    let t = replace_unicode(s.trim()).replace("{,}", ",");
    let t = strip_spacing_escapes(&t);
    let t = rename_commands(&t);
    let t = regex!(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ").replace_all(&t, "");
    let t = handle_text_commands(&t, 0);
    // Subscripts are kept braced so that removing spaces cannot glue the next
    // token on: `\log_2 8` must not become `\log_28`.
    let t = regex!(r"_\s*([0-9A-Za-z])").replace_all(&t, "_{$1}");
    let t = strip_trailing_units(&t);
    let t = fix_shorthand_args(&t, 0);
    let t = collapse_whitespace(&t);
    final_cleanup(&t)
}

fn replace_unicode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '−' | '–' | '—' => out.push('-'),
            '×' => out.push_str("\\times "),
            '·' | '⋅' => out.push_str("\\cdot "),
            '÷' => out.push_str("\\div "),
            'π' => out.push_str("\\pi "),
            '∞' => out.push_str("\\infty "),
            '√' => out.push_str("\\sqrt "),
            '≤' => out.push_str("\\le "),
            '≥' => out.push_str("\\ge "),
            '°' => {}
            '\u{a0}' => out.push(' '),
            _ => out.push(c),
        }
    }
    out
}

/// Removes TeX spacing (`\!`, `\,`, `\;`, `\:`, `~`), dollar signs and percent
/// signs, while keeping `\\` (matrix row separators) intact.
fn strip_spacing_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.peek().copied() {
                Some('\\') => {
                    chars.next();
                    out.push_str("\\\\");
                }
                // Spacing, escaped `$`/`%`, and `\(`/`\)` math delimiters.
                Some('!' | ',' | ';' | ':' | '$' | '%' | '(' | ')') => {
                    chars.next();
                }
                Some(' ' | '\n' | '\t') => {
                    chars.next();
                    out.push(' ');
                }
                _ => out.push('\\'),
            },
            '~' | '\n' | '\r' | '\t' => out.push(' '),
            '$' | '%' => {}
            _ => out.push(c),
        }
    }
    out
}

/// Splits `s` at a backslash command: returns (name, rest after name). The name
/// is the run of ASCII letters (possibly empty).
fn split_command(s: &str) -> (&str, &str) {
    let body = &s[1..];
    let n = body
        .find(|c: char| !c.is_ascii_alphabetic())
        .unwrap_or(body.len());
    (&body[..n], &body[n..])
}

/// Canonical spellings for synonymous commands; `None` keeps the command.
fn command_alias(name: &str) -> Option<&'static str> {
    Some(match name {
        "dfrac" | "tfrac" | "cfrac" => "\\frac",
        "dbinom" | "tbinom" => "\\binom",
        "left" | "right" | "bigl" | "bigr" | "Bigl" | "Bigr" | "biggl" | "biggr" | "big"
        | "Big" | "bigg" | "displaystyle" | "textstyle" | "limits" => "",
        "leq" | "leqslant" | "leqq" => "\\le",
        "geq" | "geqslant" | "geqq" => "\\ge",
        "neq" => "\\ne",
        "ldots" | "cdots" | "dotsc" | "dotsb" => "\\dots",
        "lbrace" => "\\{",
        "rbrace" => "\\}",
        "degree" | "degrees" => "",
        "quad" | "qquad" => " ",
        _ => return None,
    })
}

fn rename_commands(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let rest = &s[i..];
        if rest.starts_with('\\') {
            let (name, after) = split_command(rest);
            if name.is_empty() {
                // `\{`, `\\`, ...: copy the escape as a unit.
                let len = 1 + after.chars().next().map_or(0, char::len_utf8);
                out.push_str(&rest[..len]);
                i += len;
                continue;
            }
            match command_alias(name) {
                Some(alias) => {
                    out.push_str(alias);
                    // `\right.` is an invisible delimiter: drop the dot too.
                    let dot = (name == "left" || name == "right") && after.starts_with('.');
                    i += 1 + name.len() + usize::from(dot);
                    // Keep `\le x` from fusing into `\lex`.
                    if alias.starts_with('\\') && alias.len() > 2 {
                        out.push(' ');
                    }
                }
                None => {
                    out.push('\\');
                    out.push_str(name);
                    i += 1 + name.len();
                }
            }
            continue;
        }
        let c = rest.chars().next().unwrap_or(' ');
        out.push(c);
        i += c.len_utf8();
    }
    // Bracket style of a matrix carries no meaning for an answer.
    out.replace("{bmatrix}", "{pmatrix}")
}

/// The matching `}` of every unescaped `{` in one string, found in a single pass
/// so that thousands of unclosed groups cost O(n) in total, not O(n) each.
struct Braces<'a> {
    text: &'a str,
    close: HashMap<usize, usize>,
}

impl<'a> Braces<'a> {
    fn new(text: &'a str) -> Self {
        let mut close = HashMap::new();
        let mut open = Vec::new();
        let mut chars = text.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '{' => open.push(i),
                '}' => {
                    if let Some(o) = open.pop() {
                        close.insert(o, i);
                    }
                }
                _ => {}
            }
        }
        Braces { text, close }
    }

    /// `rest` is a suffix of the indexed text starting with `{`: returns the
    /// group's content and the bytes it spans, braces included.
    fn group<'b>(&self, rest: &'b str) -> Option<(&'b str, usize)> {
        let start = (rest.as_ptr() as usize).checked_sub(self.text.as_ptr() as usize)?;
        let end = *self.close.get(&start)?;
        let len = end.checked_sub(start)?;
        Some((rest.get(1..len)?, len + 1))
    }
}

/// Text-mode wrappers that may hold units (`5\text{ cm}`) or words (`\text{east}`).
const TEXT_COMMANDS: &[&str] = &["text", "textrm", "textnormal", "mbox", "mathrm", "textup"];
/// Pure font changes: always unwrapped.
const FONT_COMMANDS: &[&str] = &[
    "textbf",
    "textit",
    "mathbf",
    "mathit",
    "boldsymbol",
    "bm",
    "mathsf",
    "mathtt",
    "operatorname",
    "emph",
];

/// Unwraps `\text{...}`-like groups, dropping the ones that are units after a
/// quantity (`5\text{ cm}^2` -> `5`) and turning `\text{ and }` into a comma.
fn handle_text_commands(s: &str, depth: usize) -> String {
    if depth > MAX_REWRITE_DEPTH {
        return s.to_string();
    }
    let braces = Braces::new(s);
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let rest = &s[i..];
        if rest.starts_with('\\') {
            let (name, after) = split_command(rest);
            let is_text = TEXT_COMMANDS.contains(&name);
            if is_text || FONT_COMMANDS.contains(&name) {
                let after_trim = after.trim_start();
                let group = after_trim
                    .starts_with('{')
                    .then(|| braces.group(after_trim))
                    .flatten();
                let Some((content, span)) = group else {
                    // No argument: the command itself carries no meaning.
                    i += 1 + name.len();
                    continue;
                };
                i += (rest.len() - after_trim.len()) + span;
                let core = content.trim();
                if core.is_empty() {
                    continue;
                }
                if is_text && (core.eq_ignore_ascii_case("and") || core.eq_ignore_ascii_case("or"))
                {
                    out.push(',');
                } else if is_text && follows_quantity(&out) && looks_like_unit(name, content) {
                    i += unit_exponent_len(&s[i..], &braces);
                } else {
                    out.push_str(&handle_text_commands(content, depth + 1));
                }
                continue;
            }
        }
        let c = rest.chars().next().unwrap_or(' ');
        out.push(c);
        i += c.len_utf8();
    }
    out
}

fn follows_quantity(out: &str) -> bool {
    out.trim_end()
        .chars()
        .last()
        .is_some_and(|c| c.is_ascii_digit() || matches!(c, '}' | ')' | '.'))
}

fn looks_like_unit(command: &str, content: &str) -> bool {
    let core = content.trim();
    let plausible = core.starts_with(|c: char| c.is_ascii_alphabetic())
        && core.split_whitespace().count() <= 4
        && core
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " /^.-{}".contains(c));
    // `\mathrm{d}`, `\mathrm{e}` are math symbols; a mathrm unit is either
    // spaced off (`\mathrm{~cm}`) or longer than one letter.
    let mathrm_ok =
        command != "mathrm" || content.starts_with(char::is_whitespace) || core.len() > 1;
    plausible && mathrm_ok
}

/// Length of a `^2` / `^{3}` right after a dropped unit (square units etc.).
fn unit_exponent_len(s: &str, braces: &Braces) -> usize {
    let trimmed = s.trim_start();
    let skipped = s.len() - trimmed.len();
    let Some(exp) = trimmed.strip_prefix('^') else {
        return 0;
    };
    if exp.starts_with('{') {
        return braces.group(exp).map_or(0, |(_, span)| skipped + 1 + span);
    }
    exp.chars()
        .next()
        .filter(char::is_ascii_digit)
        .map_or(0, |_| skipped + 2)
}

/// `5 cm`, `12 square units` -> the number (what an unwrapped `\text{5 cm}` leaves).
fn strip_trailing_units(s: &str) -> String {
    let re = regex!(
        r"^\s*(-?[0-9.,]*[0-9])\s+[A-Za-z]{2,}(?:\s+[A-Za-z]+){0,3}\s*(?:\^\s*[23])?\s*\.?\s*$"
    );
    match re.captures(s) {
        Some(c) => c[1].to_string(),
        None => s.to_string(),
    }
}

/// Adds braces to shorthand arguments: `\frac12` -> `\frac{1}{2}`, `\sqrt2` ->
/// `\sqrt{2}`, `\frac\pi2` -> `\frac{\pi}{2}`.
fn fix_shorthand_args(s: &str, depth: usize) -> String {
    if depth > MAX_REWRITE_DEPTH {
        return s.to_string();
    }
    let braces = Braces::new(s);
    let mut out = String::with_capacity(s.len() + 8);
    let mut i = 0;
    while i < s.len() {
        let rest = &s[i..];
        if rest.starts_with('\\') {
            let (name, after) = split_command(rest);
            let nargs = match name {
                "frac" | "binom" => 2,
                "sqrt" => 1,
                _ => 0,
            };
            if nargs > 0 {
                out.push('\\');
                out.push_str(name);
                i += 1 + name.len();
                let mut tail = after;
                if name == "sqrt" {
                    // Optional index: `\sqrt[3]{x}`.
                    let t = tail.trim_start();
                    if let Some(close) = t.strip_prefix('[').and_then(|b| b.find(']')) {
                        out.push_str(&t[..close + 2]);
                        i += (tail.len() - t.len()) + close + 2;
                        tail = &t[close + 2..];
                    }
                }
                for _ in 0..nargs {
                    let Some((arg, used)) = read_arg(tail, &braces) else {
                        break;
                    };
                    out.push('{');
                    out.push_str(&fix_shorthand_args(arg, depth + 1));
                    out.push('}');
                    i += used;
                    tail = &tail[used..];
                }
                continue;
            }
            if !name.is_empty() {
                out.push('\\');
                out.push_str(name);
                i += 1 + name.len();
                continue;
            }
        }
        let c = rest.chars().next().unwrap_or(' ');
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// One macro argument: a braced group, a control word, or a single character.
/// Returns (argument text without braces, bytes consumed including leading spaces).
fn read_arg<'b>(s: &'b str, braces: &Braces) -> Option<(&'b str, usize)> {
    let t = s.trim_start();
    let skip = s.len() - t.len();
    let c = t.chars().next()?;
    match c {
        '{' => {
            let (content, span) = braces.group(t)?;
            Some((content, skip + span))
        }
        '\\' => {
            let (name, _) = split_command(t);
            if name.is_empty() {
                return None;
            }
            Some((&t[..name.len() + 1], skip + name.len() + 1))
        }
        '}' | '^' | '_' | '&' => None,
        _ => Some((&t[..c.len_utf8()], skip + c.len_utf8())),
    }
}

/// Drops all whitespace except the single space that keeps a control word from
/// fusing with a following letter (`\pi r` must not become `\pir`).
fn collapse_whitespace(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_command = false;
    let mut pending_space = false;
    let mut prev_backslash = false;
    for c in s.chars() {
        if c.is_whitespace() {
            pending_space = true;
            prev_backslash = false;
            continue;
        }
        if pending_space {
            if in_command && c.is_ascii_alphabetic() {
                out.push(' ');
            }
            // Whatever follows a space is a new token, never part of a command.
            in_command = false;
            pending_space = false;
        }
        if prev_backslash {
            in_command = c.is_ascii_alphabetic();
            prev_backslash = false;
        } else if c == '\\' {
            prev_backslash = true;
            in_command = false;
        } else if !c.is_ascii_alphabetic() {
            in_command = false;
        }
        out.push(c);
    }
    out
}

fn final_cleanup(s: &str) -> String {
    let mut t = s.trim().to_string();
    // Trailing sentence punctuation and stray row breaks.
    loop {
        let before = t.len();
        t = t.trim_end_matches('.').trim_end().to_string();
        if let Some(x) = t.strip_suffix("\\\\") {
            t = x.to_string();
        }
        if t.len() == before {
            break;
        }
    }
    // `x^{2}` -> `x^2`, but not when a digit follows: `x^{2}3` is not `x^23`.
    let t = regex!(r"\^\{([0-9A-Za-z])\}([0-9]?)").replace_all(&t, |c: &regex::Captures| {
        if c[2].is_empty() {
            format!("^{}", &c[1])
        } else {
            c[0].to_string()
        }
    });
    let t = regex!(r"\^\{\\prime\}|\^\\prime").replace_all(&t, "'");
    let mut t = t.into_owned();

    // A short left-hand side (`x=`, `k=`, `f(x)=`, `x\in`) names the answer, it is
    // not part of it.
    let prefix = regex!(
        r"^(?:[A-Za-z]|\\(?:alpha|beta|gamma|theta|lambda|mu|omega|phi|varphi|sigma|tau|rho))(?:_\{[0-9A-Za-z]+\})?(?:\([A-Za-z]\))?(=|\\in)(.+)$"
    );
    if let Some(c) = prefix.captures(&t) {
        let rest = &c[2];
        let ok = if &c[1] == "=" {
            !rest.contains('=')
        } else {
            // `x\infty` is not `x \in fty`.
            !rest.starts_with(|ch: char| ch.is_ascii_alphabetic())
        };
        if ok {
            t = rest.trim().to_string();
        }
    }

    // Multiple-choice letters: `(C)` -> `C`.
    if let Some(c) = regex!(r"^\(([A-Ea-e])\)$").captures(&t) {
        t = c[1].to_string();
    }
    if regex!(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$").is_match(&t) {
        t = t.replace(',', "");
    }
    canonical_decimal(&t).unwrap_or(t)
}

/// `025` -> `25`, `.50` -> `0.5`, `+3` -> `3`, `56.0` -> `56`, `-0` -> `0`.
fn canonical_decimal(s: &str) -> Option<String> {
    let c = regex!(r"^([+-]?)(\d*)(?:\.(\d*))?$").captures(s)?;
    let int = c[2].trim_start_matches('0');
    let frac = c.get(3).map_or("", |m| m.as_str()).trim_end_matches('0');
    if c[2].is_empty() && c.get(3).is_none_or(|m| m.as_str().is_empty()) {
        return None;
    }
    let int = if int.is_empty() { "0" } else { int };
    let sign = if &c[1] == "-" && !(int == "0" && frac.is_empty()) {
        "-"
    } else {
        ""
    };
    Some(if frac.is_empty() {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    })
}

// ---------------------------------------------------------------------------
// Equivalence
// ---------------------------------------------------------------------------

/// Gold may be a JSON-ish value: a string, a number, or a list of strings (olympiadbench). The caller passes a GoldAnswer.
#[derive(Debug, Clone, PartialEq)]
pub enum GoldAnswer {
    Text(String),
    Number(f64),
    List(Vec<String>),
}

/// Grades an extracted prediction against a gold answer; a `List` gold accepts any element.
pub fn grade(pred: &str, gold: &GoldAnswer) -> bool {
    match gold {
        GoldAnswer::Text(g) => is_equiv(pred, g),
        GoldAnswer::Number(x) => x.is_finite() && is_equiv(pred, &format_number(*x)),
        GoldAnswer::List(items) => items.iter().any(|g| is_equiv(pred, g)),
    }
}

fn format_number(x: f64) -> String {
    if x.is_finite() && x.fract() == 0.0 && x.abs() < 1e15 {
        // Exact for |x| < 2^53, so the cast cannot lose digits.
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

/// Are two answers mathematically equivalent? Order: normalized string equality; numeric equality within relative tolerance 1e-4 (integers, decimals, commas in thousands like 1,000, fractions a/b and \frac, scientific notation, \sqrt{..}, \pi, percentages vs decimals is NOT required); tuples/intervals/sets element by element (respect open/closed brackets for intervals; sets `\{1,2\}` unordered); symbolic equality by evaluating both expressions at several random points (variables are single letters like x, y, n, a; support + - * / ^, implicit multiplication like 2x, parentheses, \frac, \sqrt, \cdot, \times, \pi, e as Euler only when not a variable... keep it sensible) with a relative tolerance.
pub fn is_equiv(pred: &str, gold: &str) -> bool {
    let p = normalize_answer(pred);
    let g = normalize_answer(gold);
    if p.is_empty() || g.is_empty() {
        return false;
    }
    if p == g {
        return true;
    }
    if pred.len() > MAX_EQUIV_LEN || gold.len() > MAX_EQUIV_LEN {
        return false;
    }
    let budget = Cell::new(WORK_BUDGET);
    equiv_normalized(&p, &g, 0, &budget)
}

/// Compares two already-normalized answers, trying structure before scalars.
fn equiv_normalized(a: &str, b: &str, depth: usize, budget: &Cell<u32>) -> bool {
    if a.is_empty() || b.is_empty() {
        return false;
    }
    if a == b {
        return true;
    }
    if depth > MAX_STRUCT_DEPTH || budget.get() == 0 {
        return false;
    }
    budget.set(budget.get() - 1);

    // `1\pm\sqrt{2}` stands for the two-element answer `1+\sqrt{2}, 1-\sqrt{2}`.
    let pm_a = expand_pm(a);
    let pm_b = expand_pm(b);
    if pm_a.is_some() || pm_b.is_some() {
        let la = pm_a.unwrap_or_else(|| split_top(a, ","));
        let lb = pm_b.unwrap_or_else(|| split_top(b, ","));
        return unordered_equiv(&la, &lb, depth, budget);
    }

    match (parse_matrix(a), parse_matrix(b)) {
        (Some(ma), Some(mb)) => {
            return ma.len() == mb.len()
                && ma.iter().zip(&mb).all(|(ra, rb)| {
                    ra.len() == rb.len()
                        && ra
                            .iter()
                            .zip(rb)
                            .all(|(x, y)| item_equiv(x, y, depth, budget))
                });
        }
        (None, None) => {}
        _ => return false,
    }

    let ua = split_top(a, "\\cup");
    let ub = split_top(b, "\\cup");
    if ua.len() > 1 || ub.len() > 1 {
        return unordered_equiv(&ua, &ub, depth, budget);
    }

    match (set_items(a), set_items(b)) {
        (Some(sa), Some(sb)) => return unordered_equiv(&sa, &sb, depth, budget),
        (None, None) => {}
        // A solution set may be written bare: `\{1,2\}` vs `1, 2`. A tuple is
        // not a set, though.
        (Some(sa), None) => {
            return bracketed_items(b).is_none()
                && unordered_equiv(&sa, &split_top(b, ","), depth, budget)
        }
        (None, Some(sb)) => {
            return bracketed_items(a).is_none()
                && unordered_equiv(&split_top(a, ","), &sb, depth, budget)
        }
    }

    match (bracketed_items(a), bracketed_items(b)) {
        (Some((oa, ia, ca)), Some((ob, ib, cb))) => {
            // Open/closed ends matter for intervals; order matters for tuples.
            return oa == ob && ca == cb && ordered_equiv(&ia, &ib, depth, budget);
        }
        (None, None) => {}
        _ => return false,
    }

    // A bare comma list is a set of solutions: order does not matter.
    let la = split_top(a, ",");
    let lb = split_top(b, ",");
    if la.len() > 1 || lb.len() > 1 {
        return unordered_equiv(&la, &lb, depth, budget);
    }

    if let (Some((l1, r1)), Some((l2, r2))) = (split_equation(a), split_equation(b)) {
        return equation_equiv((l1, r1), (l2, r2), depth, budget);
    }

    scalar_equiv(a, b)
}

/// Items of a structure are re-normalized so `x=1` inside a tuple loses its prefix.
fn item_equiv(a: &str, b: &str, depth: usize, budget: &Cell<u32>) -> bool {
    let na = normalize_answer(a);
    let nb = normalize_answer(b);
    equiv_normalized(&na, &nb, depth + 1, budget)
}

fn ordered_equiv(a: &[String], b: &[String], depth: usize, budget: &Cell<u32>) -> bool {
    a.len() == b.len()
        && a.len() <= MAX_LIST_ITEMS
        && a.iter()
            .zip(b)
            .all(|(x, y)| item_equiv(x, y, depth, budget))
}

/// Greedy multiset matching; with equivalence being (nearly) transitive this
/// finds a perfect matching whenever one exists.
fn unordered_equiv(a: &[String], b: &[String], depth: usize, budget: &Cell<u32>) -> bool {
    if a.len() != b.len() || a.len() > MAX_LIST_ITEMS {
        return false;
    }
    let mut used = vec![false; b.len()];
    'outer: for x in a {
        for (j, y) in b.iter().enumerate() {
            if !used[j] && item_equiv(x, y, depth, budget) {
                used[j] = true;
                continue 'outer;
            }
        }
        return false;
    }
    true
}

/// Splits at `sep` occurrences outside any bracket. Brackets are counted by kind-
/// agnostic depth so half-open intervals like `[0,1)` balance.
fn split_top(s: &str, sep: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    let mut i = 0;
    while i < s.len() {
        let rest = &s[i..];
        if depth == 0 && rest.starts_with(sep) {
            // `\cup` must not match the start of `\cupcake`-like words.
            let after = &rest[sep.len()..];
            let whole_word =
                !sep.starts_with('\\') || !after.starts_with(|c: char| c.is_ascii_alphabetic());
            if whole_word {
                parts.push(s[start..i].to_string());
                i += sep.len();
                start = i;
                continue;
            }
        }
        let c = rest.chars().next().unwrap_or(' ');
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            _ => {}
        }
        i += c.len_utf8();
    }
    parts.push(s[start..].to_string());
    parts
}

/// Whether the bracket opened at byte 0 closes exactly at the last byte.
fn wraps_whole(s: &str) -> bool {
    let mut depth = 0i32;
    let last = s.len().saturating_sub(1);
    for (i, c) in s.char_indices() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => {
                depth -= 1;
                if depth == 0 && i != last {
                    return false;
                }
            }
            _ => {}
        }
    }
    depth == 0
}

/// `(a,b)` / `[a,b)` ... -> (open, items, close). Needs at least two items so a
/// parenthesized scalar `(5)` stays a scalar.
fn bracketed_items(s: &str) -> Option<(char, Vec<String>, char)> {
    let open = s.chars().next()?;
    let close = s.chars().last()?;
    if !matches!(open, '(' | '[') || !matches!(close, ')' | ']') || s.len() < 2 || !wraps_whole(s) {
        return None;
    }
    let items = split_top(&s[1..s.len() - 1], ",");
    (items.len() >= 2).then_some((open, items, close))
}

/// `\{1,2\}` -> ["1", "2"].
fn set_items(s: &str) -> Option<Vec<String>> {
    let inner = s.strip_prefix("\\{")?.strip_suffix("\\}")?;
    if !wraps_whole(&s[1..]) {
        return None;
    }
    Some(split_top(inner, ","))
}

fn parse_matrix(s: &str) -> Option<Vec<Vec<String>>> {
    let inner = s
        .strip_prefix("\\begin{pmatrix}")?
        .strip_suffix("\\end{pmatrix}")?;
    let rows: Vec<Vec<String>> = split_top(inner, "\\\\")
        .iter()
        .filter(|r| !r.trim().is_empty())
        .map(|r| split_top(r, "&"))
        .collect();
    (!rows.is_empty() && rows.iter().map(Vec::len).sum::<usize>() <= MAX_LIST_ITEMS).then_some(rows)
}

/// Exactly one `\pm` (and no list commas) -> the two signed variants. Nesting
/// does not matter: `\frac{-1\pm\sqrt5}{2}` is two values just the same.
fn expand_pm(s: &str) -> Option<Vec<String>> {
    if s.matches("\\pm").count() != 1 || split_top(s, ",").len() > 1 {
        return None;
    }
    Some(vec![s.replacen("\\pm", "+", 1), s.replacen("\\pm", "-", 1)])
}

fn split_equation(s: &str) -> Option<(String, String)> {
    let parts = split_top(s, "=");
    if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
        return None;
    }
    let mut it = parts.into_iter();
    Some((it.next()?, it.next()?))
}

fn equation_equiv(
    (l1, r1): (String, String),
    (l2, r2): (String, String),
    depth: usize,
    budget: &Cell<u32>,
) -> bool {
    if item_equiv(&l1, &l2, depth, budget) && item_equiv(&r1, &r2, depth, budget) {
        return true;
    }
    if item_equiv(&l1, &r2, depth, budget) && item_equiv(&r1, &l2, depth, budget) {
        return true;
    }
    // Rearranged equations: compare L-R on both sides, up to sign.
    let da = format!("({l1})-({r1})");
    scalar_equiv(&da, &format!("({l2})-({r2})")) || scalar_equiv(&da, &format!("({r2})-({l2})"))
}

/// Numeric or symbolic comparison of two single expressions.
fn scalar_equiv(a: &str, b: &str) -> bool {
    // Distinct canonical integer literals are different answers; the relative
    // tolerance would otherwise accept 12345 for 12346.
    let int_lit = regex!(r"^-?\d+$");
    if int_lit.is_match(a) && int_lit.is_match(b) {
        return false;
    }
    if has_text_word(a) || has_text_word(b) {
        return false;
    }
    let mut vars = Vec::new();
    let (Some(ea), Some(eb)) = (parse_expr(a, &mut vars), parse_expr(b, &mut vars)) else {
        return false;
    };
    if vars.is_empty() {
        let (x, y) = (ea.eval(&[]), eb.eval(&[]));
        return x.is_finite() && y.is_finite() && close(x, y, NUMERIC_REL_TOL);
    }
    vars.len() <= MAX_VARS && symbolic_equal(&ea, &eb, vars.len())
}

fn close(x: f64, y: f64, rel_tol: f64) -> bool {
    // An exact zero against float noise (`\sin\pi` = 1.2e-16) has no relative
    // scale, so it gets a tiny absolute one.
    if x == 0.0 || y == 0.0 {
        return (x - y).abs() < 1e-12;
    }
    (x - y).abs() <= rel_tol * x.abs().max(y.abs())
}

/// A run of 3+ letters outside a control word is prose (`east`, `Evelyn`), which
/// must not be read as a product of variables.
fn has_text_word(s: &str) -> bool {
    let mut run = String::new();
    let mut in_command = false;
    for c in s.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphabetic() {
            if !in_command {
                run.push(c);
            }
            continue;
        }
        if run.len() >= 3 && !BARE_FUNCTIONS.iter().any(|(n, _)| *n == run) {
            return true;
        }
        run.clear();
        in_command = c == '\\';
    }
    false
}

/// Deterministic sampling so grading is reproducible run to run.
struct Lcg(u64);

impl Lcg {
    fn next_f64(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn symbolic_equal(a: &Expr, b: &Expr, nvars: usize) -> bool {
    let mut rng = Lcg(0x9E37_79B9_7F4A_7C15);
    let mut point = vec![0.0; nvars];
    let mut valid = 0;
    for k in 0..REAL_POINTS + INT_POINTS {
        let integer = k >= REAL_POINTS;
        for v in point.iter_mut() {
            let r = rng.next_f64();
            // Positive values keep sqrt/log defined; integers 2..=9 exercise
            // functions only defined on integers.
            *v = if integer {
                2.0 + (r * 8.0).floor()
            } else {
                0.5 + 2.0 * r
            };
        }
        let (x, y) = (a.eval(&point), b.eval(&point));
        match (x.is_finite(), y.is_finite()) {
            (true, true) => {
                // Sample values are O(1), so an absolute floor absorbs
                // cancellation noise like `\sin^2x+\cos^2x-1`.
                if (x - y).abs() > SYMBOLIC_REL_TOL * x.abs().max(y.abs()).max(1e-3) {
                    return false;
                }
                valid += 1;
            }
            // Different domains at a generic real point means different functions;
            // at integer points a removable singularity can be hit by chance.
            (true, false) | (false, true) if !integer => return false,
            _ => {}
        }
    }
    valid >= MIN_VALID_POINTS
}

// ---------------------------------------------------------------------------
// Expressions
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Func {
    Sqrt,
    Abs,
    Floor,
    Ceil,
    Sin,
    Cos,
    Tan,
    Cot,
    Sec,
    Csc,
    Asin,
    Acos,
    Atan,
    Sinh,
    Cosh,
    Tanh,
    Ln,
    Exp,
}

impl Func {
    fn apply(self, x: f64) -> f64 {
        match self {
            Func::Sqrt => x.sqrt(),
            Func::Abs => x.abs(),
            Func::Floor => x.floor(),
            Func::Ceil => x.ceil(),
            Func::Sin => x.sin(),
            Func::Cos => x.cos(),
            Func::Tan => x.tan(),
            Func::Cot => 1.0 / x.tan(),
            Func::Sec => 1.0 / x.cos(),
            Func::Csc => 1.0 / x.sin(),
            Func::Asin => x.asin(),
            Func::Acos => x.acos(),
            Func::Atan => x.atan(),
            Func::Sinh => x.sinh(),
            Func::Cosh => x.cosh(),
            Func::Tanh => x.tanh(),
            Func::Ln => x.ln(),
            Func::Exp => x.exp(),
        }
    }
}

/// Function names as control words (`\sin`) and, for sloppy output, bare (`sin`).
/// Longest names first so `arcsin` is not read as `a r c sin`.
const BARE_FUNCTIONS: &[(&str, Func)] = &[
    ("arcsin", Func::Asin),
    ("arccos", Func::Acos),
    ("arctan", Func::Atan),
    ("sinh", Func::Sinh),
    ("cosh", Func::Cosh),
    ("tanh", Func::Tanh),
    ("sqrt", Func::Sqrt),
    ("sin", Func::Sin),
    ("cos", Func::Cos),
    ("tan", Func::Tan),
    ("cot", Func::Cot),
    ("sec", Func::Sec),
    ("csc", Func::Csc),
    ("exp", Func::Exp),
    ("log", Func::Ln),
    ("ln", Func::Ln),
];

const GREEK: &[&str] = &[
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "varepsilon",
    "zeta",
    "eta",
    "theta",
    "vartheta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "varphi",
    "chi",
    "psi",
    "omega",
    "Gamma",
    "Delta",
    "Theta",
    "Lambda",
    "Xi",
    "Sigma",
    "Phi",
    "Psi",
    "Omega",
];

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(f64),
    Var(String),
    Plus,
    Minus,
    Mul,
    Div,
    Pow,
    Bang,
    Underscore,
    LParen,
    RParen,
    LBrace,
    RBrace,
    LBrack,
    RBrack,
    Bar,
    LFloor,
    RFloor,
    LCeil,
    RCeil,
    Frac,
    Sqrt,
    Binom,
    Func(Func),
}

#[derive(Debug, Clone, Copy)]
enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
}

#[derive(Debug, Clone)]
enum Expr {
    Num(f64),
    Var(usize),
    Neg(Box<Expr>),
    Bin(BinOp, Box<Expr>, Box<Expr>),
    Call(Func, Box<Expr>),
    Fact(Box<Expr>),
    Binom(Box<Expr>, Box<Expr>),
    /// An unknown function `f(x)`, `I(0)`: evaluated as a fixed generic smooth
    /// function (seeded by its name) so that `I(0)` is not read as `I*0 = 0`.
    Apply(f64, Box<Expr>),
}

impl Expr {
    fn bin(op: BinOp, a: Expr, b: Expr) -> Expr {
        Expr::Bin(op, Box::new(a), Box::new(b))
    }

    fn eval(&self, vars: &[f64]) -> f64 {
        match self {
            Expr::Num(x) => *x,
            Expr::Var(i) => vars.get(*i).copied().unwrap_or(f64::NAN),
            Expr::Neg(a) => -a.eval(vars),
            Expr::Bin(op, a, b) => {
                let (x, y) = (a.eval(vars), b.eval(vars));
                match op {
                    BinOp::Add => x + y,
                    BinOp::Sub => x - y,
                    BinOp::Mul => x * y,
                    BinOp::Div => x / y,
                    BinOp::Pow => x.powf(y),
                }
            }
            Expr::Call(f, a) => f.apply(a.eval(vars)),
            Expr::Fact(a) => factorial(a.eval(vars)),
            Expr::Binom(n, k) => binomial(n.eval(vars), k.eval(vars)),
            Expr::Apply(seed, a) => {
                let x = a.eval(vars);
                (1.3 * x + seed).sin() + 0.7 * (0.9 * x - seed).cos() + 0.1 * seed
            }
        }
    }
}

fn as_small_int(x: f64, max: f64) -> Option<u32> {
    (x.is_finite() && x >= 0.0 && x <= max && (x - x.round()).abs() < 1e-9)
        .then(|| x.round() as u32)
}

fn factorial(x: f64) -> f64 {
    // 170! is the largest factorial representable in f64.
    match as_small_int(x, 170.0) {
        Some(n) => (2..=n).map(f64::from).product(),
        None => f64::NAN,
    }
}

fn binomial(n: f64, k: f64) -> f64 {
    match as_small_int(k, 1000.0) {
        Some(k) => (0..k).fold(1.0, |acc, i| acc * (n - f64::from(i)) / f64::from(i + 1)),
        None => f64::NAN,
    }
}

fn tokenize(s: &str) -> Option<Vec<Tok>> {
    let chars: Vec<char> = s.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if toks.len() > MAX_TOKENS {
            return None;
        }
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            let start = i;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            if i < chars.len() && chars[i] == '.' {
                i += 1;
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
            }
            // Scientific notation only when digits follow: `2e` is 2 times e.
            if i < chars.len() && (chars[i] == 'e' || chars[i] == 'E') {
                let mut j = i + 1;
                if j < chars.len() && (chars[j] == '+' || chars[j] == '-') {
                    j += 1;
                }
                if j < chars.len() && chars[j].is_ascii_digit() {
                    while j < chars.len() && chars[j].is_ascii_digit() {
                        j += 1;
                    }
                    i = j;
                }
            }
            let text: String = chars[start..i].iter().collect();
            toks.push(Tok::Num(text.parse().ok()?));
            continue;
        }
        if c.is_ascii_alphabetic() {
            let at_run_start = i == 0 || !chars[i - 1].is_ascii_alphabetic();
            if at_run_start {
                let run: String = chars[i..]
                    .iter()
                    .take_while(|c| c.is_ascii_alphabetic())
                    .collect();
                if let Some((name, f)) = BARE_FUNCTIONS.iter().find(|(n, _)| run.starts_with(n)) {
                    toks.push(if *f == Func::Sqrt {
                        Tok::Sqrt
                    } else {
                        Tok::Func(*f)
                    });
                    i += name.len();
                    continue;
                }
            }
            i += 1;
            // `e^...` is the exponential; a lone `e` stays a variable.
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            if c == 'e' && next == Some(&'^') {
                toks.push(Tok::Num(std::f64::consts::E));
                continue;
            }
            let (sub, used) = read_subscript(&chars[i..]);
            i += used;
            toks.push(Tok::Var(format!("{c}{sub}")));
            continue;
        }
        if c == '\\' {
            let start = i + 1;
            let mut j = start;
            while j < chars.len() && chars[j].is_ascii_alphabetic() {
                j += 1;
            }
            let name: String = chars[start..j].iter().collect();
            if name.is_empty() {
                // Spacing escapes are harmless; any other escape (`\{`, `\\`) is structure.
                match chars.get(start) {
                    Some(',' | ';' | '!' | ':' | ' ') => {
                        i = start + 1;
                        continue;
                    }
                    _ => return None,
                }
            }
            i = j;
            let tok = match name.as_str() {
                "frac" | "dfrac" | "tfrac" => Tok::Frac,
                "sqrt" => Tok::Sqrt,
                "binom" | "dbinom" | "tbinom" => Tok::Binom,
                "pi" => Tok::Num(std::f64::consts::PI),
                "cdot" | "times" | "ast" => Tok::Mul,
                "div" => Tok::Div,
                "lfloor" => Tok::LFloor,
                "rfloor" => Tok::RFloor,
                "lceil" => Tok::LCeil,
                "rceil" => Tok::RCeil,
                "left" | "right" => {
                    if chars.get(i) == Some(&'.') {
                        i += 1;
                    }
                    continue;
                }
                _ => {
                    if let Some((_, f)) = BARE_FUNCTIONS.iter().find(|(n, _)| *n == name) {
                        Tok::Func(*f)
                    } else if GREEK.contains(&name.as_str()) {
                        let (sub, used) = read_subscript(&chars[i..]);
                        i += used;
                        Tok::Var(format!("\\{name}{sub}"))
                    } else {
                        return None;
                    }
                }
            };
            toks.push(tok);
            continue;
        }
        let tok = match c {
            '+' => Tok::Plus,
            '-' => Tok::Minus,
            '*' => Tok::Mul,
            '/' => Tok::Div,
            '^' => Tok::Pow,
            '!' => Tok::Bang,
            '_' => Tok::Underscore,
            '(' => Tok::LParen,
            ')' => Tok::RParen,
            '{' => Tok::LBrace,
            '}' => Tok::RBrace,
            '[' => Tok::LBrack,
            ']' => Tok::RBrack,
            '|' => Tok::Bar,
            _ => return None,
        };
        toks.push(tok);
        i += 1;
    }
    (toks.len() <= MAX_TOKENS).then_some(toks)
}

/// A variable's subscript (`_1`, `_{n}`) becomes part of its name.
fn read_subscript(chars: &[char]) -> (String, usize) {
    if chars.first() != Some(&'_') {
        return (String::new(), 0);
    }
    match chars.get(1) {
        Some('{') => {
            let mut depth = 0;
            for (k, &c) in chars.iter().enumerate().skip(1) {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            return (chars[..=k].iter().collect(), k + 1);
                        }
                    }
                    _ => {}
                }
            }
            (String::new(), 0)
        }
        Some(c) if c.is_ascii_alphanumeric() => (format!("_{c}"), 2),
        _ => (String::new(), 0),
    }
}

struct Parser<'a> {
    toks: Vec<Tok>,
    pos: usize,
    depth: usize,
    vars: &'a mut Vec<String>,
}

/// Parses a whole expression; `vars` is shared between the two sides of a
/// comparison so the same name maps to the same slot.
fn parse_expr(s: &str, vars: &mut Vec<String>) -> Option<Expr> {
    if let Some(mixed) = mixed_number(s) {
        return Some(Expr::Num(mixed));
    }
    let toks = tokenize(s)?;
    if toks.is_empty() {
        return None;
    }
    let mut p = Parser {
        toks,
        pos: 0,
        depth: 0,
        vars,
    };
    let e = p.sum()?;
    (p.pos == p.toks.len()).then_some(e)
}

/// `1\frac{4}{5}` is the mixed number 9/5 (only with a proper fraction, where
/// that reading is unambiguous), not 1 times 4/5.
fn mixed_number(s: &str) -> Option<f64> {
    let c = regex!(r"^(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}$").captures(s)?;
    let whole: f64 = c[2].parse().ok()?;
    let num: f64 = c[3].parse().ok()?;
    let den: f64 = c[4].parse().ok()?;
    if num >= den || den == 0.0 {
        return None;
    }
    let v = whole + num / den;
    Some(if &c[1] == "-" { -v } else { v })
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn eat(&mut self, t: &Tok) -> bool {
        if self.peek() == Some(t) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, t: &Tok) -> Option<()> {
        self.eat(t).then_some(())
    }

    /// Runs `f` one nesting level deeper, refusing past the depth limit.
    fn nested<T>(&mut self, f: impl FnOnce(&mut Self) -> Option<T>) -> Option<T> {
        if self.depth >= MAX_PARSE_DEPTH {
            return None;
        }
        self.depth += 1;
        let r = f(self);
        self.depth -= 1;
        r
    }

    fn sum(&mut self) -> Option<Expr> {
        self.nested(|p| {
            let mut lhs = p.product()?;
            loop {
                if p.eat(&Tok::Plus) {
                    lhs = Expr::bin(BinOp::Add, lhs, p.product()?);
                } else if p.eat(&Tok::Minus) {
                    lhs = Expr::bin(BinOp::Sub, lhs, p.product()?);
                } else {
                    return Some(lhs);
                }
            }
        })
    }

    fn product(&mut self) -> Option<Expr> {
        self.nested(|p| {
            let mut lhs = p.unary()?;
            loop {
                if p.eat(&Tok::Mul) {
                    lhs = Expr::bin(BinOp::Mul, lhs, p.unary()?);
                } else if p.eat(&Tok::Div) {
                    lhs = Expr::bin(BinOp::Div, lhs, p.unary()?);
                } else if p.peek().is_some_and(starts_operand) {
                    // Implicit multiplication: `2x`, `(a+1)(b+2)`, `3\sqrt{2}`.
                    lhs = Expr::bin(BinOp::Mul, lhs, p.power()?);
                } else {
                    return Some(lhs);
                }
            }
        })
    }

    fn unary(&mut self) -> Option<Expr> {
        self.nested(|p| {
            if p.eat(&Tok::Minus) {
                Some(Expr::Neg(Box::new(p.unary()?)))
            } else if p.eat(&Tok::Plus) {
                p.unary()
            } else {
                p.power()
            }
        })
    }

    fn power(&mut self) -> Option<Expr> {
        self.nested(|p| {
            let base = p.postfix()?;
            if p.eat(&Tok::Pow) {
                // Right-associative, and `2^-1` is allowed.
                let exp = p.unary()?;
                let e = Expr::bin(BinOp::Pow, base, exp);
                return p.factorials(e);
            }
            Some(base)
        })
    }

    fn postfix(&mut self) -> Option<Expr> {
        let e = self.primary()?;
        self.factorials(e)
    }

    fn factorials(&mut self, mut e: Expr) -> Option<Expr> {
        while self.eat(&Tok::Bang) {
            e = Expr::Fact(Box::new(e));
        }
        Some(e)
    }

    fn enclosed(&mut self, close: &Tok) -> Option<Expr> {
        let e = self.sum()?;
        self.expect(close)?;
        Some(e)
    }

    /// A macro argument: `{expr}` or a single primary (`\frac12` style).
    fn arg(&mut self) -> Option<Expr> {
        if self.eat(&Tok::LBrace) {
            self.enclosed(&Tok::RBrace)
        } else {
            self.primary()
        }
    }

    fn primary(&mut self) -> Option<Expr> {
        self.nested(|p| {
            let tok = p.peek()?.clone();
            p.pos += 1;
            match tok {
                Tok::Num(x) => Some(Expr::Num(x)),
                Tok::Var(name) if is_function_name(&name) && p.peek() == Some(&Tok::LParen) => {
                    p.pos += 1;
                    let arg = p.enclosed(&Tok::RParen)?;
                    let seed = name.bytes().map(f64::from).sum::<f64>() * 0.37;
                    Some(Expr::Apply(seed, Box::new(arg)))
                }
                Tok::Var(name) => {
                    let idx = match p.vars.iter().position(|v| *v == name) {
                        Some(i) => i,
                        None => {
                            p.vars.push(name);
                            p.vars.len() - 1
                        }
                    };
                    Some(Expr::Var(idx))
                }
                Tok::LParen => p.enclosed(&Tok::RParen),
                Tok::LBrace => p.enclosed(&Tok::RBrace),
                Tok::LBrack => p.enclosed(&Tok::RBrack),
                Tok::Bar => Some(Expr::Call(Func::Abs, Box::new(p.enclosed(&Tok::Bar)?))),
                Tok::LFloor => Some(Expr::Call(Func::Floor, Box::new(p.enclosed(&Tok::RFloor)?))),
                Tok::LCeil => Some(Expr::Call(Func::Ceil, Box::new(p.enclosed(&Tok::RCeil)?))),
                Tok::Frac => {
                    let num = p.arg()?;
                    let den = p.arg()?;
                    Some(Expr::bin(BinOp::Div, num, den))
                }
                Tok::Binom => {
                    let n = p.arg()?;
                    let k = p.arg()?;
                    Some(Expr::Binom(Box::new(n), Box::new(k)))
                }
                Tok::Sqrt => {
                    if p.eat(&Tok::LBrack) {
                        let index = p.enclosed(&Tok::RBrack)?;
                        let radicand = p.arg()?;
                        let inv = Expr::bin(BinOp::Div, Expr::Num(1.0), index);
                        return Some(Expr::bin(BinOp::Pow, radicand, inv));
                    }
                    Some(Expr::Call(Func::Sqrt, Box::new(p.arg()?)))
                }
                Tok::Func(f) => p.function(f),
                _ => None,
            }
        })
    }

    /// `\sin x`, `\sin^2 x`, `\log_2 8`, `\ln(x+1)`.
    fn function(&mut self, f: Func) -> Option<Expr> {
        let mut base = None;
        let mut exponent = None;
        for _ in 0..2 {
            if f == Func::Ln && base.is_none() && self.eat(&Tok::Underscore) {
                base = Some(self.arg()?);
            } else if exponent.is_none() && self.eat(&Tok::Pow) {
                exponent = Some(self.arg()?);
            }
        }
        let x = self.power()?;
        let mut e = Expr::Call(f, Box::new(x));
        if let Some(b) = base {
            e = Expr::bin(BinOp::Div, e, Expr::Call(Func::Ln, Box::new(b)));
        }
        if let Some(k) = exponent {
            e = Expr::bin(BinOp::Pow, e, k);
        }
        Some(e)
    }
}

/// Letters that, directly followed by `(`, denote a function application rather
/// than a product: `f(x)`, `I(0)`. Lowercase others stay products (`n(n-1)`).
fn is_function_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!((chars.next(), chars.next()), (Some(c), None) if c.is_ascii_uppercase() || "fgh".contains(c))
}

fn starts_operand(t: &Tok) -> bool {
    matches!(
        t,
        Tok::Num(_)
            | Tok::Var(_)
            | Tok::LParen
            | Tok::LBrace
            | Tok::LBrack
            | Tok::LFloor
            | Tok::LCeil
            | Tok::Frac
            | Tok::Sqrt
            | Tok::Binom
            | Tok::Func(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    const EQUIVALENT: &[(&str, &str)] = &[
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac12", "1/2"),
        ("\\tfrac{3}{4}", "0.75"),
        ("x=3", "3"),
        ("k = 7", "7"),
        ("10\\%", "10"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90°"),
        ("\\text{5 cm}", "5"),
        ("5\\text{ cm}", "5"),
        ("864 \\mbox{ inches}^2", "864"),
        ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}"),
        ("(1,2)", "(1, 2)"),
        ("[0,1)", "[0, 1)"),
        ("\\{1,2\\}", "\\{2,1\\}"),
        ("2\\sqrt{2}", "\\sqrt{8}"),
        ("\\pi/2", "\\frac{\\pi}{2}"),
        ("x^2+2x+1", "(x+1)^2"),
        ("1,000", "1000"),
        ("1e3", "1000"),
        ("\\left(1,2\\right)", "(1,2)"),
        ("\\$32,\\!348", "32348"),
        ("11,\\! 111,\\! 111,\\! 100", "11111111100"),
        ("025", "25"),
        ("56.0", "56"),
        (".0000672", "6.72\\times 10^{-5}"),
        ("4.5e33", "4.5 \\times 10^{33}"),
        ("1\\frac{4}{5}", "\\frac{9}{5}"),
        ("\\frac{1}{\\sqrt{3}}", "\\frac{\\sqrt{3}}{3}"),
        ("-\\frac{1}{2}", "\\frac{-1}{2}"),
        ("\\sqrt[3]{2}", "2^{1/3}"),
        ("2^{10}", "1024"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("1 \\pm \\sqrt{19}", "1-\\sqrt{19}, 1+\\sqrt{19}"),
        ("x \\in [-2,7]", "[-2, 7]"),
        ("(-\\infty, 0) \\cup\\{1\\}.", "\\{1\\} \\cup (-\\infty,0)"),
        ("\\text{(C)}", "C"),
        ("\\textbf{(B)}", "(B)"),
        ("\\text{Evelyn}", "Evelyn"),
        ("3, 5, 7", "7,5,3"),
        ("x=1 \\text{ or } x=2", "\\{1,2\\}"),
        (
            "\\begin{pmatrix} -1/3 \\\\ 2/3 \\end{pmatrix}",
            "\\begin{bmatrix} -\\frac13 \\\\ \\frac23 \\end{bmatrix}",
        ),
        ("6r^2-4r-24", "2(3r^2-2r-12)"),
        ("x^5 - x^4 + x^3 - x^2 + x - 1", "(x-1)(x^4+x^2+1)"),
        ("\\frac{11+9a}{20}", "\\frac{11}{20}+\\frac{9a}{20}"),
        ("11 \\sqrt{5} + 11", "11(\\sqrt5+1)"),
        ("\\cot x", "\\frac{\\cos x}{\\sin x}"),
        ("e^{t} / 3", "\\frac{\\exp(t)}{3}"),
        ("\\binom{2n}{n}", "\\frac{(2n)!}{(n!)^2}"),
        (
            "\\lfloor\\log _{2} n\\rfloor+1",
            "\\left\\lfloor\\log_2 n\\right\\rfloor+1",
        ),
        ("-2 + 7i", "7i-2"),
        ("5x - 7y + 11z + 4 = 0", "-5x+7y-11z-4=0"),
        ("y = -\\frac{1}{2}x + 3", "3-\\frac{x}{2}"),
        ("f(x)=2x", "2x"),
        ("\\pi r^2", "r^2\\pi"),
        ("k \\geqslant 2", "k\\ge 2"),
        ("\\frac{\\sqrt{3}}{2}", "0.8660254"),
        ("$\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("5.4 \\text{ cents}", "5.4"),
    ];

    const NOT_EQUIVALENT: &[(&str, &str)] = &[
        ("1/2", "0.51"),
        ("[0,1)", "[0,1]"),
        ("(0,1)", "[0,1)"),
        ("(1,2)", "(2,1)"),
        ("x^2", "2x"),
        ("x^2", "y^2"),
        ("3", "-3"),
        ("\\sqrt{2}", "2"),
        ("\\frac{\\sqrt2}{2}", "\\sqrt2"),
        ("\\frac13", "0.33"),
        ("12345", "12346"),
        ("x+1", "x-1"),
        ("(x+1)^2", "x^2+1"),
        ("\\text{east}", "\\text{west}"),
        ("\\text{Evelyn}", "Evelny"),
        ("\\text{(C)}", "D"),
        ("\\frac{1}{2}", "(1,2)"),
        ("\\{1,2\\}", "(1,2)"),
        ("\\{1,2\\}", "\\{1,2,3\\}"),
        ("1,2", "1,2,2"),
        ("I(0)", "0"),
        ("2\\pi", "\\pi"),
        ("10^{10000}", "10^{10001}"),
        ("1/0", "2/0"),
        ("", ""),
        ("", "0"),
        ("5", "5x"),
        ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}"),
        (
            "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
            "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}",
        ),
        ("2^{1009}", "2^{1008}"),
        ("x=2y", "x=3y"),
    ];

    #[test]
    fn equivalent_pairs() {
        let failures: Vec<_> = EQUIVALENT
            .iter()
            .filter(|(a, b)| !is_equiv(a, b) || !is_equiv(b, a))
            .collect();
        assert!(failures.is_empty(), "judged different: {failures:?}");
        assert!(EQUIVALENT.len() >= 40);
    }

    #[test]
    fn non_equivalent_pairs() {
        let failures: Vec<_> = NOT_EQUIVALENT
            .iter()
            .filter(|(a, b)| is_equiv(a, b) || is_equiv(b, a))
            .collect();
        assert!(failures.is_empty(), "judged equal: {failures:?}");
        assert!(NOT_EQUIVALENT.len() >= 25);
    }

    #[test]
    fn normalization_examples() {
        let cases = [
            ("\\dfrac12", "\\frac{1}{2}"),
            ("\\frac 59", "\\frac{5}{9}"),
            ("\\frac9{19}", "\\frac{9}{19}"),
            ("\\frac\\pi2", "\\frac{\\pi}{2}"),
            ("\\sqrt2", "\\sqrt{2}"),
            ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
            ("$x = 5$.", "5"),
            ("10,\\!080", "10080"),
            ("30^\\circ", "30"),
            ("\\text{east}", "east"),
            ("5\\text{ cm}^2", "5"),
            ("\\pi r^2", "\\pi r^2"),
            ("\\angle B E A", "\\angle BEA"),
            ("x^{2}", "x^2"),
            ("(-\\infty, 0) \\cup\\{1\\}.", "(-\\infty,0)\\cup\\{1\\}"),
            (
                "\\begin{bmatrix} 1 \\\\ 2 \\end{bmatrix}",
                "\\begin{pmatrix}1\\\\2\\end{pmatrix}",
            ),
            ("+2", "2"),
            ("-0", "0"),
            ("  ", ""),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_answer(input), want, "input {input:?}");
        }
    }

    #[test]
    fn normalization_is_idempotent_on_tables() {
        for (a, b) in EQUIVALENT.iter().chain(NOT_EQUIVALENT) {
            for s in [a, b] {
                let once = normalize_answer(s);
                assert_eq!(normalize_answer(&once), once, "input {s:?}");
            }
        }
    }

    #[test]
    fn extract_boxed_cases() {
        assert_eq!(
            extract_boxed("so $\\boxed{\\frac{1}{2}}$."),
            Some("\\frac{1}{2}".into())
        );
        assert_eq!(
            extract_boxed("\\boxed{1} then \\boxed{2}"),
            Some("2".into())
        );
        assert_eq!(extract_boxed("\\boxed{1} then \\fbox{3}"), Some("3".into()));
        assert_eq!(extract_boxed("answer: \\boxed{\\frac{1}{2"), None);
        assert_eq!(extract_boxed("\\boxed{1} and then \\boxed{2"), None);
        assert_eq!(extract_boxed("thus $\\boxed 7$"), Some("7".into()));
        assert_eq!(extract_boxed("\\boxed {42}"), Some("42".into()));
        assert_eq!(
            extract_boxed("\\boxed{\\{1,2\\}}"),
            Some("\\{1,2\\}".into())
        );
        assert_eq!(
            extract_boxed("\\boxed{\\left\\{ x \\right.}"),
            Some("\\left\\{ x \\right.".into())
        );
        assert_eq!(extract_boxed("no box here"), None);
        assert_eq!(extract_boxed("\\boxed"), None);
        assert_eq!(extract_boxed("\\boxed{}"), Some(String::new()));
        assert_eq!(extract_boxed("\\boxed{5} \\boxedfoo"), Some("5".into()));
        assert_eq!(extract_boxed("é \\boxed{π}"), Some("π".into()));
    }

    #[test]
    fn extract_answer_eval_fallbacks() {
        assert_eq!(extract_answer_eval("so \\boxed{12}."), Some("12".into()));
        assert_eq!(
            extract_answer_eval("Thus the answer is $\\frac{3}{4}$."),
            Some("\\frac{3}{4}".into())
        );
        assert_eq!(
            extract_answer_eval("The final answer is: 3.5. Done"),
            Some("3.5".into())
        );
        assert_eq!(
            extract_answer_eval("work\n#### 1,234\n"),
            Some("1,234".into())
        );
        assert_eq!(
            extract_answer_eval("we get 3 apples and then 4.5 pears"),
            Some("4.5".into())
        );
        assert_eq!(extract_answer_eval("nothing numeric"), None);
        assert_eq!(extract_answer_eval(""), None);
        let got = extract_answer_eval("The answer is 1,000 dollars").expect("an answer");
        assert!(is_equiv(&got, "1000"));
    }

    #[test]
    fn grade_gold_kinds() {
        assert!(grade("27", &GoldAnswer::Number(27.0)));
        assert!(grade("27.0", &GoldAnswer::Number(27.0)));
        assert!(!grade("28", &GoldAnswer::Number(27.0)));
        assert!(grade("0.5", &GoldAnswer::Number(0.5)));
        assert!(grade("\\frac{1}{2}", &GoldAnswer::Text("0.5".into())));
        let list = GoldAnswer::List(vec!["$12$".into(), "$x=3$".into()]);
        assert!(grade("12", &list));
        assert!(grade("3", &list));
        assert!(!grade("4", &list));
        assert!(!grade("4", &GoldAnswer::List(Vec::new())));
    }

    /// Inputs that have broken naive graders: unbalanced braces, huge powers,
    /// division by zero, deep nesting, unicode, very long strings.
    fn nasty_inputs() -> Vec<String> {
        let mut v: Vec<String> = [
            "",
            " ",
            "{",
            "}",
            "}}}{{",
            "\\frac{",
            "\\frac{1}{",
            "\\frac",
            "\\sqrt",
            "\\sqrt[",
            "\\sqrt[3",
            "\\boxed{",
            "\\text{",
            "\\text{5 cm",
            "\\left(",
            "\\right)",
            "\\",
            "\\\\",
            "$",
            "$$",
            "\\$",
            "%",
            "^",
            "_",
            "^^^",
            "x^",
            "x_",
            "x_{",
            "10^{10000}",
            "10^{10^{10^{10}}}",
            "(-8)^{1/3}",
            "1/0",
            "0/0",
            "\\frac{0}{0}",
            "0^0",
            "170!",
            "171!",
            "(-1)!",
            "1.5!",
            "\\binom{1000000}{500000}",
            "\\binom{x}{y}",
            "99999999999999999999999999999999999999",
            "1e999999",
            "-1e-999999",
            "\\sqrt{-1}",
            "\\ln(0)",
            "\\log_0 1",
            "\\log_1 1",
            "é",
            "π",
            "°°°",
            "√",
            "∞",
            "日本語",
            "🙂🙂",
            "\\text{é}",
            "5\\text{ é}",
            "\\{",
            "\\}",
            "\\{\\}",
            "(",
            ")",
            "(,)",
            "[,]",
            ",,,,",
            "\\pm",
            "\\pm\\pm",
            "1\\pm",
            "\\cup",
            "\\cup\\cup",
            "=",
            "==",
            "x=",
            "=x",
            "\\begin{pmatrix}",
            "\\begin{pmatrix}\\end{pmatrix}",
            "&&&\\\\\\\\",
            "|",
            "||",
            "\\lfloor",
            "\\rceil",
            "\\sin",
            "\\sin^",
            "\\log_",
            "e^",
            "e^{e^{e^{e^{10}}}}",
            "x^{x^{x^{x^{x^{x}}}}}",
            "\\frac{1}{x-x}",
            "f(",
            "I(",
            ")(",
            "1,000,",
            ".",
            "-.",
            "--1",
            "+-+-1",
            "\\infty",
            "-\\infty",
            "\\infty-\\infty",
            "\\,\\!\\;\\:",
            "\\boxed{\\boxed{\\boxed{1}}}",
            "\\text{\\text{\\text{x}}}",
            "\\dfrac\\dfrac\\dfrac",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.push("(".repeat(5000));
        v.push(")".repeat(5000));
        v.push("{".repeat(3000) + &"}".repeat(3000));
        v.push("\\frac{".repeat(400) + "1" + &"}{2}".repeat(400));
        v.push("\\text{".repeat(300) + "x" + &"}".repeat(300));
        v.push("\\sqrt{".repeat(300) + "2" + &"}".repeat(300));
        v.push("(".repeat(300) + "1" + &")".repeat(300));
        v.push("-".repeat(900) + "1");
        v.push("1+".repeat(450) + "1");
        v.push("2^".repeat(300) + "2");
        v.push(format!("({})", vec!["1"; 400].join(",")));
        v.push(format!(
            "\\{{{}\\}}",
            (0..200)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ));
        v.push("((1,2),(3,(4,(5,(6,(7,8))))))".to_string());
        v.push("x".repeat(2000));
        // Just under the normalization cap: worst cases for brace matching.
        v.push("\\text{".repeat(330));
        v.push("\\frac{".repeat(330));
        v.push("\\sqrt{".repeat(330));
        v.push("\\boxed{".repeat(240));
        v.push("{\\text{".repeat(240));
        v.push("é".repeat(5000));
        v.push("1".repeat(200_000));
        v
    }

    #[test]
    fn nasty_inputs_never_panic_or_hang() {
        let inputs = nasty_inputs();
        let gold = [
            "1",
            "x",
            "(1,2)",
            "\\{1,2\\}",
            "\\frac{1}{2}",
            "",
            "\\infty",
        ];
        let mut slowest = Duration::ZERO;
        let mut timed = |f: &dyn Fn()| {
            let start = Instant::now();
            f();
            slowest = slowest.max(start.elapsed());
        };
        // The first call compiles the regexes; keep that out of the measurement.
        let _ = is_equiv("x=1", "1");
        let _ = extract_answer_eval("the answer is 1");
        for a in &inputs {
            timed(&|| {
                let _ = normalize_answer(a);
            });
            timed(&|| {
                let _ = extract_boxed(a);
            });
            timed(&|| {
                let _ = extract_answer_eval(a);
            });
            for g in gold {
                timed(&|| {
                    let _ = is_equiv(a, g);
                });
                timed(&|| {
                    let _ = is_equiv(g, a);
                });
            }
            timed(&|| {
                let _ = is_equiv(a, a);
            });
        }
        for (a, b) in inputs.iter().zip(inputs.iter().skip(1)) {
            timed(&|| {
                let _ = is_equiv(a, b);
            });
        }
        assert!(!is_equiv("10^{10000}", "10^{10001}"));
        assert!(!is_equiv("1/0", "1"));
        assert!(!is_equiv("}}}{{", "1"));
        println!("slowest single call on nasty inputs: {slowest:?}");
        // Generous for unoptimized test builds on a loaded machine; release
        // builds are ~10x faster.
        assert!(
            slowest < Duration::from_millis(100),
            "slowest call took {slowest:?}"
        );
    }

    #[test]
    fn extraction_is_linear_on_long_completions() {
        let texts = [
            "\\boxedx ".repeat(100_000),
            "\\fbox{".repeat(100_000),
            "\\boxed{".repeat(100_000) + &"}".repeat(99_999),
            "the answer is ".repeat(50_000),
            "1,".repeat(200_000),
            "#### ".repeat(100_000),
            "é\\boxed".repeat(100_000),
        ];
        let start = Instant::now();
        for t in &texts {
            let _ = extract_boxed(t);
            let _ = extract_answer_eval(t);
            let _ = normalize_answer(t);
            let _ = is_equiv(t, t);
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        // 100k nested boxes with one brace missing: the outer box is unclosed,
        // so the last (innermost) box still wins.
        assert_eq!(extract_boxed(&texts[2]), Some(String::new()));
    }

    #[test]
    fn deterministic_fuzz_never_panics() {
        const ALPHABET: &[&str] = &[
            "0",
            "1",
            "2",
            "7",
            "9",
            ".",
            ",",
            "x",
            "y",
            "n",
            "e",
            "i",
            "a",
            "+",
            "-",
            "*",
            "/",
            "^",
            "_",
            "!",
            "=",
            "(",
            ")",
            "[",
            "]",
            "{",
            "}",
            "|",
            " ",
            "$",
            "%",
            "&",
            "\\",
            "\\\\",
            "\\frac",
            "\\dfrac",
            "\\sqrt",
            "\\binom",
            "\\pi",
            "\\cdot",
            "\\times",
            "\\left",
            "\\right",
            "\\{",
            "\\}",
            "\\text{",
            "\\mbox{",
            "\\mathrm{",
            "\\boxed{",
            "\\fbox",
            "\\circ",
            "^\\circ",
            "\\pm",
            "\\cup",
            "\\infty",
            "\\sin",
            "\\log",
            "\\ln",
            "\\lfloor",
            "\\rfloor",
            "\\begin{pmatrix}",
            "\\end{pmatrix}",
            "\\,",
            "\\!",
            "~",
            " cm",
            "é",
            "π",
            "°",
            "−",
            "日",
            "1e5",
            "10^{999}",
            "the answer is ",
            "####",
            "\n",
        ];
        let mut state: u64 = 0x1234_5678_9ABC_DEF0;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as usize
        };
        let start = Instant::now();
        let mut equal = 0usize;
        let mut prev = String::new();
        for _ in 0..3000 {
            let len = next() % 24;
            let s: String = (0..len)
                .map(|_| ALPHABET[next() % ALPHABET.len()])
                .collect();
            let _ = extract_boxed(&s);
            let _ = extract_answer_eval(&s);
            let n = normalize_answer(&s);
            if is_equiv(&s, &prev) {
                equal += 1;
            }
            let _ = is_equiv(&n, &s);
            prev = s;
        }
        println!("fuzz: {equal}/3000 consecutive random strings judged equivalent");
        // Random strings are almost never equivalent to each other.
        assert!(equal < 300, "{equal} random pairs judged equal");
        assert!(start.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn symbolic_check_uses_shared_variables() {
        assert!(is_equiv("a+b", "b+a"));
        assert!(!is_equiv("a-b", "b-a"));
        assert!(is_equiv("\\frac{x^2-1}{x-1}", "x+1"));
        assert!(is_equiv("n(n-1)", "n^2-n"));
        assert!(is_equiv("\\sin^2 x + \\cos^2 x", "1"));
        assert!(is_equiv("\\log_2 8", "3"));
        assert!(is_equiv("|{-3}|", "3"));
        assert!(is_equiv("\\sin^2 x + \\cos^2 x - 1", "0x"));
        assert!(is_equiv("\\sin(\\pi)", "0"));
        assert!(!is_equiv("1.325e-27", "5e-27"));
        assert!(is_equiv("(-1)^{n+1}", "-(-1)^n"));
        assert!(!is_equiv("(-1)^n", "1"));
    }
}
