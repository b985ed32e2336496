//! Both stages end to end with a scripted model, through the run store:
//! authored prompts and questions become `PromptRecord`s and
//! `QuestionRecord`s that the store keeps and gives back unchanged.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use agfsync_author::{
    author_prompts, author_questions, prompt_records, BagOfWords, ChatRequest, FakeLlm,
    PromptAuthoring, QuestionAuthoring, Template,
};
use agfsync_store::Store;
use serde_json::json;

fn last(r: &ChatRequest) -> String {
    r.messages.last().unwrap().content.clone()
}

#[test]
fn prompts_and_questions_reach_the_run_store() {
    let llm = FakeLlm::from_fn(|r| {
        let m = last(r);
        if m.contains("category \"animals\"") {
            return Ok(r#"{"prompts": ["two red foxes playing in fresh snow", "a grey heron standing in a misty pond"]}"#.into());
        }
        if m.contains("category \"plants\"") {
            return Ok(
                "```json\n{'prompts': ['a potted cactus with pink flowers on a sunny windowsill',]}\n```"
                    .into(),
            );
        }
        let q = |q: &str, t: &str, e: &str| json!({"question": q, "element_type": t, "element": e, "answer": "yes"});
        Ok(if m.contains("foxes") {
            json!({"questions": [
                q("Are there foxes?", "animal", "foxes"),
                q("Are exactly two animals shown?", "counting", "two"),
                q("Are the foxes red?", "color", "red"),
                q("Are the foxes playing?", "activity", "playing"),
                q("Is there snow on the ground?", "object", "snow"),
                q("Does the snow look fresh?", "attribute", "fresh"),
            ]})
        } else if m.contains("heron") {
            json!({"questions": [
                q("Is there a heron?", "animal", "heron"),
                q("Is the bird grey?", "color", "grey"),
                q("Is the heron standing?", "activity", "standing"),
                q("Is there a pond?", "object", "pond"),
                q("Is the pond misty?", "attribute", "misty"),
            ]})
        } else {
            // Too few for the cactus: the prompt is dropped.
            json!({"questions": [q("Is there a cactus?", "object", "cactus")]})
        }
        .to_string())
    })
    .with_name("fake:e2e");
    let prompt_config = PromptAuthoring {
        categories: vec!["animals".into(), "plants".into()],
        ..PromptAuthoring::default()
    };
    let prompts = author_prompts(
        &llm,
        &BagOfWords::default(),
        &Template::default_prompts().unwrap(),
        &prompt_config,
    )
    .unwrap();
    assert_eq!(prompts.prompts.len(), 3);
    assert_eq!(prompts.stats.unparsable, 0);
    let records = prompt_records(&prompts.prompts, 0);

    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_or_create(dir.path()).unwrap();
    assert_eq!(store.insert_prompts(&records).unwrap(), 3);
    let stored = store.prompts().unwrap();
    assert_eq!(stored, records);
    assert!(stored[0].source.starts_with("llm:{\"model\":\"fake:e2e\""));

    let questions = author_questions(
        &llm,
        &BagOfWords::default(),
        &Template::default_questions().unwrap(),
        &stored,
        &QuestionAuthoring {
            calls_per_prompt: 1,
            ..QuestionAuthoring::default()
        },
    )
    .unwrap();
    let kept: Vec<_> = questions.sets.iter().filter(|s| s.kept).collect();
    assert_eq!(kept.len(), 2);
    assert_eq!(questions.stats.dropped_prompts, 1);
    for set in kept {
        let records = set.to_records();
        store
            .set_questions(&set.pid, &records, &set.source())
            .unwrap();
        assert_eq!(store.questions(&set.pid).unwrap(), records);
    }
}
