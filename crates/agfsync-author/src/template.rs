//! Authoring templates: the messages sent to the LLM, in a plain text file
//! a user can edit.
//!
//! ```text
//! # A line starting with '#' is a comment.
//! [system]
//! You write descriptions of images ...
//! [user]
//! Write {count} descriptions in the category "{category}". Rules: ...
//! [assistant]
//! {"prompts": ["a few-shot answer", "..."]}
//! [user]
//! ...
//! ```
//!
//! A line that is exactly `[system]`, `[user]` or `[assistant]` starts a
//! message; the file must end with a `[user]` message. Placeholders are
//! `{name}` for the names the template's kind declares (prompts:
//! `{category}`, `{count}`; questions: `{prompt}`, `{count}`); every other
//! brace is literal text, so few-shot JSON needs no escaping. Every declared
//! placeholder must appear somewhere, because a template without
//! `{category}` would ask every category for the same thing.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{AuthorError, Result};
use crate::llm::{Message, Role};

/// The default prompt-writing template (AGFSync's rules and a few-shot
/// example).
pub const DEFAULT_PROMPTS_TEMPLATE: &str = include_str!("../templates/prompts.txt");

/// The default question-writing template (TIFA-style questions).
pub const DEFAULT_QUESTIONS_TEMPLATE: &str = include_str!("../templates/questions.txt");

/// Placeholders of a prompt template.
pub const PROMPT_PLACEHOLDERS: &[&str] = &["category", "count"];

/// Placeholders of a question template.
pub const QUESTION_PLACEHOLDERS: &[&str] = &["prompt", "count"];

/// A parsed template.
#[derive(Clone, Debug, PartialEq)]
pub struct Template {
    name: String,
    hash: String,
    messages: Vec<Message>,
}

impl Template {
    /// Parses template `text`; `name` is for error messages and
    /// `placeholders` are the names that must (and may) be substituted.
    pub fn parse(name: &str, text: &str, placeholders: &[&str]) -> Result<Self> {
        let bad = |reason: String| AuthorError::Template {
            name: name.to_string(),
            reason,
        };
        let mut messages: Vec<Message> = Vec::new();
        for (n, line) in text.trim_start_matches('\u{feff}').lines().enumerate() {
            let role = match line.trim_end() {
                "[system]" => Some(Role::System),
                "[user]" => Some(Role::User),
                "[assistant]" => Some(Role::Assistant),
                _ => None,
            };
            if let Some(role) = role {
                messages.push(Message {
                    role,
                    content: String::new(),
                });
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            match messages.last_mut() {
                Some(m) => {
                    m.content.push_str(line);
                    m.content.push('\n');
                }
                None if line.trim().is_empty() => {}
                None => {
                    return Err(bad(format!(
                        "line {}: text before the first [system]/[user]/[assistant] line",
                        n + 1
                    )))
                }
            }
        }
        for m in &mut messages {
            m.content = m.content.trim().to_string();
        }
        match messages.last() {
            Some(m) if m.role == Role::User => {}
            _ => return Err(bad("the last message must be a [user] message".into())),
        }
        if let Some(i) = messages.iter().position(|m| m.content.is_empty()) {
            return Err(bad(format!("message {} is empty", i + 1)));
        }
        for p in placeholders {
            let tag = format!("{{{p}}}");
            if !messages.iter().any(|m| m.content.contains(&tag)) {
                return Err(bad(format!("placeholder {tag} is missing")));
            }
        }
        Ok(Self {
            name: name.to_string(),
            hash: text_hash(text),
            messages,
        })
    }

    /// Reads and parses a template file.
    pub fn from_file(path: &Path, placeholders: &[&str]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthorError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &text, placeholders)
    }

    /// The default prompt template.
    pub fn default_prompts() -> Result<Self> {
        Self::parse(
            "default prompts template",
            DEFAULT_PROMPTS_TEMPLATE,
            PROMPT_PLACEHOLDERS,
        )
    }

    /// The default question template.
    pub fn default_questions() -> Result<Self> {
        Self::parse(
            "default questions template",
            DEFAULT_QUESTIONS_TEMPLATE,
            QUESTION_PLACEHOLDERS,
        )
    }

    /// Where the template came from.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// 16 hex digits of SHA-256 over the template's text, for provenance.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The messages with `{name}` replaced by `value` for every pair in
    /// `vars` (in one pass, so a value containing `{count}` stays literal).
    pub fn render(&self, vars: &[(&str, &str)]) -> Vec<Message> {
        self.messages
            .iter()
            .map(|m| Message {
                role: m.role,
                content: substitute(&m.content, vars),
            })
            .collect()
    }
}

/// Replaces `{name}` tags in one left-to-right pass.
fn substitute(text: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    'scan: while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        for (name, value) in vars {
            if after.starts_with(name) && after[name.len()..].starts_with('}') {
                out.push_str(value);
                rest = &after[name.len() + 1..];
                continue 'scan;
            }
        }
        out.push('{');
        rest = after;
    }
    out.push_str(rest);
    out
}

/// 16 hex digits of SHA-256 over `text`.
pub fn text_hash(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        let t = Template::default_prompts().unwrap();
        let m = t.render(&[("category", "animals"), ("count", "20")]);
        assert_eq!(m.last().unwrap().role, Role::User);
        assert!(m.iter().any(|m| m.content.contains("animals")));
        assert!(!m.iter().any(|m| m.content.contains("{category}")));
        let t = Template::default_questions().unwrap();
        let m = t.render(&[("prompt", "a cat"), ("count", "15")]);
        assert!(m.iter().any(|m| m.content.contains("a cat")));
        assert_eq!(t.hash().len(), 16);
    }

    #[test]
    fn braces_in_examples_stay_and_values_are_not_rescanned() {
        let t = Template::parse(
            "t",
            "[user]\nWrite {count} about {category}. Example: {\"prompts\": [\"x\"]} {other}",
            PROMPT_PLACEHOLDERS,
        )
        .unwrap();
        let m = t.render(&[("category", "{count}"), ("count", "3")]);
        assert_eq!(
            m[0].content,
            "Write 3 about {count}. Example: {\"prompts\": [\"x\"]} {other}"
        );
    }

    #[test]
    fn malformed_templates_are_refused() {
        for (text, why) in [
            ("hello\n[user]\n{category} {count}", "before the first"),
            ("[user]\n{category}", "{count} is missing"),
            ("[system]\n{category} {count}", "last message"),
            ("[user]\n\n[user]\n{category} {count}", "empty"),
        ] {
            let e = Template::parse("t", text, PROMPT_PLACEHOLDERS)
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }

    #[test]
    fn comments_and_few_shot_turns() {
        let t = Template::parse(
            "t",
            "# comment\n[system]\nsys\n[user]\nshow {count}\n[assistant]\n{\"prompts\": []}\n[user]\nnow {category}\n",
            PROMPT_PLACEHOLDERS,
        )
        .unwrap();
        let roles: Vec<_> = t.render(&[]).iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            vec![Role::System, Role::User, Role::Assistant, Role::User]
        );
    }
}
