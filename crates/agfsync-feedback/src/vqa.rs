//! The VQA score (AGFSync section 4, "Scores"): how well an image follows
//! its prompt, judged by a VLM answering the prompt's TIFA-style questions
//! (An et al., "AGFSync", AAAI 2025; Hu et al., "TIFA", ICCV 2023), plus the
//! continuous VQAScore (Lin et al., "Evaluating Text-to-Visual Generation
//! with Image-to-Text Generation", 2024). The VLM is LLaVA-1.5
//! ([`crate::llava`]).
//!
//! Per image and question:
//!
//! * yes/no questions (no choices, or exactly `yes` and `no`): the prompt
//!   is [`VqaOptions::question_template`] (AGFSync's
//!   `Question: {question} Choices: ['yes', 'no'] Answer:`) inside the
//!   model's chat template. The answer is the greedy continuation (up to
//!   [`VqaOptions::max_new_tokens`] tokens) parsed by [`parse_yes_no`]: the
//!   first word, case and punctuation ignored (`Yes, there is` is yes;
//!   `nobody`, `know`, `b` are not no: the AGFSync code's substring test
//!   counted them as no). Unparseable answers are recorded as such and are
//!   not correct. P(yes) is read from the first answer position: the summed
//!   softmax probability (full vocabulary, not renormalised over yes/no) of
//!   every token that on its own is the word yes (`Yes`, `yes`, `▁Yes`,
//!   `Ġyes`, ... as [`Llava::answer_token_ids`] finds them); P(no) likewise.
//! * multiple-choice questions (TIFA): each choice's total log-likelihood
//!   given the prompt (its tokens split from the prompt's at their common
//!   prefix, as lm-eval-harness does); the answer is the best choice.
//!
//! A question is correct when its answer equals the question's `answer`
//! (yes when absent, AGFSync's convention: its questions are written so
//! that the prompt implies yes). The score is AGFSync's
//! `100 * correct / questions`; with no questions it is `100 * VQAScore`.
//! `details` holds `p_yes_mean`, `vqascore` (P(yes) for
//! `Does this figure show "{prompt}"? Please answer yes or no.`), counts,
//! and per question `q{i}.p_yes` / `q{i}.correct` / `q{i}.answer` (1 yes,
//! 0 no, -1 unparseable, or the chosen choice's index); `notes` holds the
//! answers' text. [`VqaScorer::answer`] returns the same as structs.
//!
//! Each image is encoded once and the shared prompt prefix (everything up
//! to and including the image tokens) is run once into a KV cache; the
//! questions then continue it as a left-padded batch.

use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor, D};

use agfsync_models::llama::{LmInput, LogitsAt};

use crate::error::{FeedbackError, Result};
use crate::image_input::LoadedImage;
use crate::llava::{Llava, LLAVA15_TEMPLATE};
use crate::scorer::{BatchCache, ImageOutcome, Question, ScoreRequest, ScoreResult, Scorer};

/// Version of the VQA score computation; bump when the formula changes.
pub const VQA_SCORE_VERSION: &str = "vqa-score/1 100*correct/questions greedy+P(yes)";

/// AGFSync's question prompt; `{question}` and `{choices}` (a Python-style
/// list, `['yes', 'no']`) are filled in.
pub const AGFSYNC_QUESTION_TEMPLATE: &str = "Question: {question} Choices: {choices} Answer:";

/// VQAScore's prompt (Lin et al. 2024); `{prompt}` is the image's prompt.
pub const VQASCORE_TEMPLATE: &str = "Does this figure show \"{prompt}\"? Please answer yes or no.";

/// How questions are put to the model.
#[derive(Clone, Debug, PartialEq)]
pub struct VqaOptions {
    /// The model's conversation template, holding `<image>` and `{text}`.
    pub chat_template: String,
    /// The question prompt, holding `{question}` and optionally `{choices}`.
    pub question_template: String,
    /// The VQAScore prompt, holding `{prompt}`; empty to skip VQAScore.
    pub vqascore_template: String,
    /// Greedy answer length limit (yes/no questions).
    pub max_new_tokens: usize,
    /// Sequences per forward pass (each repeats the image prefix's cache).
    pub rows_per_forward: usize,
}

impl Default for VqaOptions {
    fn default() -> Self {
        Self {
            chat_template: LLAVA15_TEMPLATE.into(),
            question_template: AGFSYNC_QUESTION_TEMPLATE.into(),
            vqascore_template: VQASCORE_TEMPLATE.into(),
            max_new_tokens: 6,
            rows_per_forward: 8,
        }
    }
}

/// A parsed yes/no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum YesNo {
    /// The answer says yes.
    Yes,
    /// The answer says no.
    No,
}

/// Parses a free-text answer as yes or no: the first word (letters and
/// digits), case-insensitive, after leading spaces and punctuation. Only
/// the whole words `yes` and `no` count; anything else (`nobody`, `know`,
/// `b`, an empty answer) is `None`.
pub fn parse_yes_no(text: &str) -> Option<YesNo> {
    let word: String = text
        .trim_start_matches(|c: char| !c.is_alphanumeric())
        .chars()
        .take_while(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect();
    match word.as_str() {
        "yes" => Some(YesNo::Yes),
        "no" => Some(YesNo::No),
        _ => None,
    }
}

/// What a question asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QuestionKind {
    /// Yes or no.
    YesNo,
    /// One of these choices.
    MultipleChoice(Vec<String>),
}

/// Classifies a question: no choices, or exactly yes and no (any case), is
/// yes/no; anything else is multiple choice.
pub fn question_kind(q: &Question) -> QuestionKind {
    let norm: Vec<String> = q.choices.iter().map(|c| c.trim().to_lowercase()).collect();
    let yes_no = norm.is_empty()
        || (norm.len() == 2
            && norm.contains(&"yes".to_string())
            && norm.contains(&"no".to_string()));
    if yes_no {
        QuestionKind::YesNo
    } else {
        QuestionKind::MultipleChoice(q.choices.clone())
    }
}

/// The model's answer to one question about one image.
#[derive(Clone, Debug, PartialEq)]
pub struct QuestionAnswer {
    /// The question text.
    pub question: String,
    /// The answer's text (greedy decoding, or the chosen choice).
    pub text: String,
    /// The generated token ids (yes/no questions).
    pub token_ids: Vec<u32>,
    /// The parsed yes/no answer (`None`: unparseable, or multiple choice).
    pub yes_no: Option<YesNo>,
    /// The chosen choice's index (multiple choice).
    pub choice: Option<usize>,
    /// P(yes) at the first answer position (yes/no questions).
    pub p_yes: Option<f64>,
    /// P(no) at the first answer position (yes/no questions).
    pub p_no: Option<f64>,
    /// Total log-likelihood of each choice (multiple choice).
    pub choice_logliks: Vec<f64>,
    /// Whether the answer equals the expected one.
    pub correct: bool,
}

/// Every answer about one image.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageAnswers {
    /// One per question, in order.
    pub answers: Vec<QuestionAnswer>,
    /// VQAScore: P(yes) for the VQAScore prompt (`None` if disabled).
    pub vqascore: Option<f64>,
}

impl ImageAnswers {
    /// AGFSync's score, `100 * correct / questions` (`None` without
    /// questions).
    pub fn agfsync_score(&self) -> Option<f64> {
        if self.answers.is_empty() {
            return None;
        }
        let correct = self.answers.iter().filter(|a| a.correct).count();
        Some(100.0 * correct as f64 / self.answers.len() as f64)
    }

    /// Mean P(yes) over the yes/no questions (`None` without any).
    pub fn p_yes_mean(&self) -> Option<f64> {
        let ps: Vec<f64> = self.answers.iter().filter_map(|a| a.p_yes).collect();
        (!ps.is_empty()).then(|| ps.iter().sum::<f64>() / ps.len() as f64)
    }
}

/// Renders choices as a Python list literal, `['yes', 'no']` (what the
/// AGFSync code's f-string produced).
pub fn python_list(choices: &[String]) -> String {
    let items: Vec<String> = choices.iter().map(|c| format!("'{c}'")).collect();
    format!("[{}]", items.join(", "))
}

/// The VQA score metric on LLaVA-1.5.
#[derive(Debug)]
pub struct VqaScorer {
    model: Arc<Llava>,
    options: VqaOptions,
    yes_ids: Vec<u32>,
    no_ids: Vec<u32>,
    eos_ids: Vec<u32>,
    version: String,
    batch_size: usize,
}

impl VqaScorer {
    /// A scorer on `model`. Fails when the tokenizer has no token for yes
    /// or no, or a template lacks its placeholders.
    pub fn new(model: Arc<Llava>, options: VqaOptions) -> Result<Self> {
        if !options.chat_template.contains("<image>") || !options.chat_template.contains("{text}") {
            return Err(FeedbackError::Invalid(format!(
                "the chat template must hold `<image>` and `{{text}}`: {:?}",
                options.chat_template
            )));
        }
        if !options.question_template.contains("{question}") {
            return Err(FeedbackError::Invalid(format!(
                "the question template must hold `{{question}}`: {:?}",
                options.question_template
            )));
        }
        let yes_ids = model.answer_token_ids("yes");
        let no_ids = model.answer_token_ids("no");
        if yes_ids.is_empty() || no_ids.is_empty() {
            return Err(FeedbackError::Invalid(format!(
                "the tokenizer of {} has no single token for `yes` or `no`: P(yes) cannot \
                 be read from it",
                model.identity()
            )));
        }
        let eos_ids = model.lm().config().eos_token_ids.clone();
        let version = format!(
            "{VQA_SCORE_VERSION}; model={}; chat={:?}; question={:?}; vqascore={:?}; \
             max_new_tokens={}; preprocess=transformers-{}",
            model.identity(),
            options.chat_template,
            options.question_template,
            options.vqascore_template,
            options.max_new_tokens,
            model.processor().backend().name()
        );
        Ok(Self {
            model,
            options,
            yes_ids,
            no_ids,
            eos_ids,
            version,
            batch_size: 4,
        })
    }

    /// Sets the preferred batch size (images per call).
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// The model.
    pub fn model(&self) -> &Arc<Llava> {
        &self.model
    }

    /// The token ids counted as yes and as no.
    pub fn answer_ids(&self) -> (&[u32], &[u32]) {
        (&self.yes_ids, &self.no_ids)
    }

    /// The full prompt for a question text.
    pub fn chat_prompt(&self, text: &str) -> String {
        self.options.chat_template.replace("{text}", text)
    }

    /// The question text for a question.
    pub fn question_text(&self, q: &Question) -> String {
        let choices = match question_kind(q) {
            QuestionKind::YesNo => python_list(&["yes".to_string(), "no".to_string()]),
            QuestionKind::MultipleChoice(c) => python_list(&c),
        };
        self.options
            .question_template
            .replace("{question}", q.question.trim())
            .replace("{choices}", &choices)
    }

    /// Answers `questions` about each image (and the VQAScore prompt for
    /// `prompt`). One outcome per image: an image that cannot be
    /// preprocessed gets its own error.
    pub fn answer(
        &self,
        images: &[&LoadedImage],
        prompt: &str,
        questions: &[Question],
    ) -> Result<Vec<std::result::Result<ImageAnswers, FeedbackError>>> {
        let mut out = Vec::with_capacity(images.len());
        for img in images {
            let feats = match self.model.encode_image(img) {
                Ok(f) => f,
                Err(e @ FeedbackError::Image { .. }) => {
                    out.push(Err(e));
                    continue;
                }
                Err(e) => return Err(e),
            };
            out.push(Ok(self.answer_one(&feats, prompt, questions)?));
        }
        Ok(out)
    }

    /// Answers every question about one image from its features
    /// (`[image_tokens, hidden]`).
    pub fn answer_one(
        &self,
        features: &Tensor,
        prompt: &str,
        questions: &[Question],
    ) -> Result<ImageAnswers> {
        // Yes/no rows (the questions, then VQAScore) and multiple-choice rows.
        let mut yn_texts: Vec<(Option<usize>, String)> = Vec::new();
        for (i, q) in questions.iter().enumerate() {
            if question_kind(q) == QuestionKind::YesNo {
                yn_texts.push((Some(i), self.chat_prompt(&self.question_text(q))));
            }
        }
        if !self.options.vqascore_template.is_empty() {
            let text = self
                .options
                .vqascore_template
                .replace("{prompt}", prompt.trim());
            yn_texts.push((None, self.chat_prompt(&text)));
        }
        let mut answers: Vec<Option<QuestionAnswer>> = vec![None; questions.len()];
        let mut vqascore = None;
        let mut before: Option<Vec<u32>> = None;
        let mut yn_rows = Vec::with_capacity(yn_texts.len());
        for (i, text) in &yn_texts {
            let ids = self.model.encode_prompt(text)?;
            check_prefix(&mut before, &ids.before, text)?;
            yn_rows.push((*i, ids.after));
        }
        // Multiple choice: (question, choice, suffix ids, continuation length).
        let mut mc_rows: Vec<(usize, usize, Vec<u32>, usize)> = Vec::new();
        for (i, q) in questions.iter().enumerate() {
            let QuestionKind::MultipleChoice(choices) = question_kind(q) else {
                continue;
            };
            let text = self.chat_prompt(&self.question_text(q));
            let base = self.model.encode_prompt(&text)?;
            check_prefix(&mut before, &base.before, &text)?;
            for (c, choice) in choices.iter().enumerate() {
                let full = self
                    .model
                    .encode_prompt(&format!("{text} {}", choice.trim()))?;
                check_prefix(&mut before, &full.before, &text)?;
                let common = base
                    .after
                    .iter()
                    .zip(&full.after)
                    .take_while(|(a, b)| a == b)
                    .count();
                let cont = full.after.len() - common;
                if cont == 0 || common == 0 {
                    return Err(FeedbackError::Invalid(format!(
                        "choice {choice:?} of question {:?} adds no token after the prompt",
                        q.question
                    )));
                }
                mc_rows.push((i, c, full.after, cont));
            }
        }
        let before = before.unwrap_or_default();
        let prefix = self.model.prefix_cache(&before, features)?;
        let lm = self.model.lm();
        let chunk = self.options.rows_per_forward.max(1);

        for group in yn_rows.chunks(chunk) {
            let seqs: Vec<&[u32]> = group.iter().map(|(_, s)| s.as_slice()).collect();
            let (ids, mask) = left_pad(&seqs, self.model.device())?;
            let mut cache = prefix.repeat_rows(group.len())?;
            let (gen, first) = lm.generate_greedy(
                LmInput::Ids(&ids),
                Some(&mask),
                &mut cache,
                self.options.max_new_tokens,
                &self.eos_ids,
            )?;
            let probs = candle_nn::ops::softmax_last_dim(&first)?;
            for (r, (qi, _)) in group.iter().enumerate() {
                let row: Vec<f32> = probs.i(r)?.to_vec1()?;
                let p_yes: f64 = self
                    .yes_ids
                    .iter()
                    .map(|&t| f64::from(row[t as usize]))
                    .sum();
                let p_no: f64 = self
                    .no_ids
                    .iter()
                    .map(|&t| f64::from(row[t as usize]))
                    .sum();
                let Some(qi) = *qi else {
                    vqascore = Some(p_yes);
                    continue;
                };
                let q = &questions[qi];
                let text = self.model.decode(&gen[r]);
                let parsed = parse_yes_no(&text);
                let expected = q.answer.as_deref().map_or(Some(YesNo::Yes), parse_yes_no);
                answers[qi] = Some(QuestionAnswer {
                    question: q.question.clone(),
                    text,
                    token_ids: gen[r].clone(),
                    yes_no: parsed,
                    choice: None,
                    p_yes: Some(p_yes),
                    p_no: Some(p_no),
                    choice_logliks: Vec::new(),
                    correct: parsed.is_some() && parsed == expected,
                });
            }
        }

        let mut logliks: Vec<Vec<f64>> = questions.iter().map(|_| Vec::new()).collect();
        for group in mc_rows.chunks(chunk) {
            let seqs: Vec<&[u32]> = group.iter().map(|(_, _, s, _)| s.as_slice()).collect();
            let (ids, mask) = left_pad(&seqs, self.model.device())?;
            let width = ids.dim(1)?;
            let mut cache = prefix.repeat_rows(group.len())?;
            let logits = lm.forward(LmInput::Ids(&ids), Some(&mask), &mut cache, LogitsAt::All)?;
            let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            for (r, (qi, _, seq, cont)) in group.iter().enumerate() {
                let pad = width - seq.len();
                let row = logp.i(r)?;
                let mut total = 0f64;
                for (j, &tok) in seq.iter().enumerate().skip(seq.len() - cont) {
                    // Token j is predicted by the position before it.
                    let lp = row.i((pad + j - 1, tok as usize))?.to_scalar::<f32>()?;
                    total += f64::from(lp);
                }
                logliks[*qi].push(total);
            }
        }
        for (qi, ll) in logliks.into_iter().enumerate() {
            let QuestionKind::MultipleChoice(choices) = question_kind(&questions[qi]) else {
                continue;
            };
            let q = &questions[qi];
            let best = ll
                .iter()
                .enumerate()
                .fold(None::<(usize, f64)>, |acc, (i, &v)| match acc {
                    Some((_, b)) if b >= v => acc,
                    _ => Some((i, v)),
                })
                .map(|(i, _)| i);
            let text = best.map(|i| choices[i].clone()).unwrap_or_default();
            let correct = match (&q.answer, best) {
                (Some(a), Some(_)) => a.trim().eq_ignore_ascii_case(text.trim()),
                _ => false,
            };
            answers[qi] = Some(QuestionAnswer {
                question: q.question.clone(),
                text,
                token_ids: Vec::new(),
                yes_no: None,
                choice: best,
                p_yes: None,
                p_no: None,
                choice_logliks: ll,
                correct,
            });
        }
        let answers = answers
            .into_iter()
            .zip(questions)
            .map(|(a, q)| {
                a.ok_or_else(|| {
                    FeedbackError::Invalid(format!(
                        "internal error: question {:?} unanswered",
                        q.question
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ImageAnswers { answers, vqascore })
    }

    fn result(&self, a: &ImageAnswers) -> ScoreResult {
        let mut details = std::collections::BTreeMap::new();
        let mut notes = Vec::new();
        let value = match (a.agfsync_score(), a.vqascore) {
            (Some(s), _) => s,
            (None, Some(v)) => {
                notes.push("vqa: no questions, the value is 100 * VQAScore".to_string());
                100.0 * v
            }
            (None, None) => 0.0,
        };
        if let Some(v) = a.vqascore {
            details.insert("vqascore".to_string(), v);
        }
        if let Some(p) = a.p_yes_mean() {
            details.insert("p_yes_mean".to_string(), p);
        }
        let n = a.answers.len();
        details.insert("questions".to_string(), n as f64);
        details.insert(
            "correct".to_string(),
            a.answers.iter().filter(|x| x.correct).count() as f64,
        );
        let unparseable = a
            .answers
            .iter()
            .filter(|x| x.p_yes.is_some() && x.yes_no.is_none())
            .count();
        details.insert("unparseable".to_string(), unparseable as f64);
        for (i, ans) in a.answers.iter().enumerate() {
            if let Some(p) = ans.p_yes {
                details.insert(format!("q{i}.p_yes"), p);
            }
            details.insert(format!("q{i}.correct"), f64::from(u8::from(ans.correct)));
            let code = match (ans.yes_no, ans.choice) {
                (Some(YesNo::Yes), _) => 1.0,
                (Some(YesNo::No), _) => 0.0,
                (None, Some(c)) => c as f64,
                (None, None) => -1.0,
            };
            details.insert(format!("q{i}.answer"), code);
            let shown = if ans.p_yes.is_some() && ans.yes_no.is_none() {
                format!("{:?} (unparseable)", ans.text)
            } else {
                format!("{:?}", ans.text)
            };
            notes.push(format!("vqa q{i} {:?}: {shown}", ans.question));
        }
        ScoreResult {
            metric: "vqa".into(),
            value,
            version: self.version.clone(),
            details,
            notes,
        }
    }
}

/// Reads questions for the VQA score: a JSON array of TIFA-style
/// [`Question`] objects, or JSON Lines (one object per line; blank lines
/// skipped). Unknown fields (TIFA's `id`, `caption`, ...) are ignored. A
/// parse error names the file, line and column.
pub fn read_questions(path: &std::path::Path) -> Result<Vec<Question>> {
    let text = std::fs::read_to_string(path).map_err(|source| FeedbackError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |line: usize, column: usize, e: &dyn std::fmt::Display| FeedbackError::Config {
        path: path.to_path_buf(),
        what: "questions file (a JSON array of questions, or JSONL)",
        reason: format!("line {line}, column {column}: {e}"),
    };
    if text.trim_start().starts_with('[') {
        return serde_json::from_str(&text).map_err(|e| bad(e.line(), e.column(), &e));
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let q: Question = serde_json::from_str(line).map_err(|e| bad(i + 1, e.column(), &e))?;
        out.push(q);
    }
    Ok(out)
}

/// All prompts about one image must share the tokens before the image, so
/// that their cached prefix is one.
fn check_prefix(shared: &mut Option<Vec<u32>>, before: &[u32], text: &str) -> Result<()> {
    match shared {
        None => {
            *shared = Some(before.to_vec());
            Ok(())
        }
        Some(s) if s.as_slice() == before => Ok(()),
        Some(_) => Err(FeedbackError::Invalid(format!(
            "the prompt {text:?} tokenises differently before `<image>` than the others: \
             the chat template must not put question text before the image"
        ))),
    }
}

/// Left-pads token sequences into `[n, max_len]` ids and a 0/1 mask.
fn left_pad(seqs: &[&[u32]], device: &Device) -> Result<(Tensor, Tensor)> {
    let width = seqs.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(seqs.len() * width);
    let mut mask = Vec::with_capacity(seqs.len() * width);
    for s in seqs {
        let pad = width - s.len();
        ids.extend(std::iter::repeat_n(0u32, pad));
        mask.extend(std::iter::repeat_n(0u8, pad));
        ids.extend_from_slice(s);
        mask.extend(std::iter::repeat_n(1u8, s.len()));
    }
    Ok((
        Tensor::from_vec(ids, (seqs.len(), width), device)?,
        Tensor::from_vec(mask, (seqs.len(), width), &Device::Cpu)?.to_dtype(DType::F32)?,
    ))
}

impl Scorer for VqaScorer {
    fn name(&self) -> &str {
        "vqa"
    }

    fn version(&self) -> &str {
        &self.version
    }

    fn preferred_batch_size(&self) -> usize {
        self.batch_size
    }

    fn score_batch(
        &self,
        images: &[&LoadedImage],
        request: &ScoreRequest<'_>,
        _cache: &mut BatchCache,
    ) -> Result<Vec<ImageOutcome>> {
        let answers = self.answer(images, request.prompt, request.questions)?;
        Ok(answers
            .into_iter()
            .map(|a| a.map(|a| self.result(&a)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yes_no_parsing_is_by_whole_first_word() {
        for (text, want) in [
            ("Yes", Some(YesNo::Yes)),
            ("yes", Some(YesNo::Yes)),
            (" YES.", Some(YesNo::Yes)),
            ("Yes, there is a red cube.", Some(YesNo::Yes)),
            ("\n\"yes\"", Some(YesNo::Yes)),
            ("No", Some(YesNo::No)),
            ("no.", Some(YesNo::No)),
            ("  No, it is blue", Some(YesNo::No)),
            ("", None),
            ("   ", None),
            ("maybe", None),
            ("There is no cube", None),
            ("yesterday", None),
        ] {
            assert_eq!(parse_yes_no(text), want, "{text:?}");
        }
    }

    #[test]
    fn regression_no_as_a_substring_is_not_no() {
        // The AGFSync code tested `"no" in answer` (and `"b" in answer`).
        for text in [
            "nobody",
            "know",
            "b",
            "I don't know",
            "snow",
            "Nope",
            "not sure",
            "noon",
        ] {
            assert_eq!(parse_yes_no(text), None, "{text:?}");
        }
    }

    #[test]
    fn question_kinds() {
        let q = |choices: &[&str]| Question {
            question: "q".into(),
            choices: choices.iter().map(|s| s.to_string()).collect(),
            ..Question::default()
        };
        assert_eq!(question_kind(&q(&[])), QuestionKind::YesNo);
        assert_eq!(question_kind(&q(&["yes", "no"])), QuestionKind::YesNo);
        assert_eq!(question_kind(&q(&["No", " Yes"])), QuestionKind::YesNo);
        assert!(matches!(
            question_kind(&q(&["red", "blue"])),
            QuestionKind::MultipleChoice(_)
        ));
        assert!(matches!(
            question_kind(&q(&["yes", "no", "maybe"])),
            QuestionKind::MultipleChoice(_)
        ));
    }

    #[test]
    fn questions_files_json_and_jsonl() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("agfsync-vqa-q-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| FeedbackError::Invalid(e.to_string()))?;
        let write = |name: &str, text: &str| -> std::path::PathBuf {
            let p = dir.join(name);
            std::fs::write(&p, text).ok();
            p
        };
        let arr = write(
            "q.json",
            r#"[{"question": "is there a cat?", "choices": ["yes", "no"], "answer": "yes", "id": 3},
                {"question": "what color?", "choices": ["red", "blue"], "answer": "red"}]"#,
        );
        let qs = read_questions(&arr)?;
        assert_eq!(qs.len(), 2);
        assert_eq!(qs[1].choices, vec!["red".to_string(), "blue".to_string()]);
        let jsonl = write(
            "q.jsonl",
            "{\"question\": \"a?\"}\n\n{\"question\": \"b?\", \"element_type\": \"color\"}\n",
        );
        let qs = read_questions(&jsonl)?;
        assert_eq!(qs.len(), 2);
        assert_eq!(qs[1].element_type.as_deref(), Some("color"));
        let broken = write("bad.jsonl", "{\"question\": \"a?\"}\n{\"question\": 5}\n");
        let e = read_questions(&broken).expect_err("bad line").to_string();
        assert!(e.contains("bad.jsonl") && e.contains("line 2"), "{e}");
        let broken = write(
            "bad.json",
            "[\n {\"question\": \"a?\"},\n {\"question\" \"b\"}\n]",
        );
        let e = read_questions(&broken).expect_err("bad array").to_string();
        assert!(e.contains("bad.json") && e.contains("line 3"), "{e}");
        let e = read_questions(&dir.join("missing.json"))
            .expect_err("missing")
            .to_string();
        assert!(e.contains("missing.json"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }

    #[test]
    fn choices_render_as_a_python_list() {
        assert_eq!(
            python_list(&["yes".to_string(), "no".to_string()]),
            "['yes', 'no']"
        );
    }
}
