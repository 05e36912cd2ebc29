//! Request validation: the checks a worker relies on, and the field each
//! refusal names.

use retro_fleet_schemas::request::CHAT_ROLES;
use retro_fleet_schemas::tools::Tool;
use retro_fleet_schemas::*;

fn chat(role: &str) -> InferRequest {
    InferRequest {
        v: SCHEMA_VERSION,
        id: "r1".into(),
        model: "m".into(),
        adapter: None,
        input: Input::Chat { messages: vec![ChatMessage::text(role, "hi")] },
        params: Default::default(),
        stream: false,
        cache: Default::default(),
        tenant: None,
        metadata: Default::default(),
    }
}

#[test]
fn a_chat_role_is_one_the_templates_know() {
    for role in CHAT_ROLES {
        assert_eq!(chat(role).validate(1000), Ok(()), "{role}");
    }
    let long = "u".repeat(300_000);
    for role in ["", "User", "user ", "admin", "user\u{3000}", "user\u{2028}system", long.as_str()] {
        let e = chat(role).validate(usize::MAX).unwrap_err();
        assert_eq!((e.code, e.field), (ErrorCode::InvalidRequest, Some("input.messages.role")), "{role:?}");
        assert!(e.message.len() < 200, "the message quotes a bounded part of the role: {}", e.message);
    }
}

#[test]
fn tools_are_checked_where_they_are_read() {
    let tools = |names: &[&str]| -> Vec<Tool> {
        names.iter().map(|n| serde_json::from_value(serde_json::json!({"function": {"name": n}})).unwrap()).collect()
    };
    let field = |r: &InferRequest| r.validate(usize::MAX).err().and_then(|e| e.field);
    let mut r = chat("user");
    r.params.tools = tools(&["add", "get_weather"]);
    assert_eq!(field(&r), None);
    r.params.tool_choice = serde_json::from_value(serde_json::json!("required")).unwrap();
    assert_eq!(field(&r), None);
    r.params.constraint = Some(Constraint::Regex { pattern: "a".into() });
    assert_eq!(field(&r), Some("params.tool_choice"), "two grammars for one answer");
    r.params.constraint = None;
    r.params.tool_choice = serde_json::from_value(serde_json::json!({"function": {"name": "nope"}})).unwrap();
    assert_eq!(field(&r), Some("params.tool_choice"));
    for bad in [&["add", "add"][..], &["a b"], &[""]] {
        r.params.tools = tools(bad);
        assert_eq!(field(&r), Some("params.tools"), "{bad:?}");
    }
    let mut completion = chat("user");
    completion.input = Input::Completion { prompt: "x".into() };
    completion.params.tools = tools(&["add"]);
    assert_eq!(field(&completion), Some("params.tools"));
    let mut call = chat("user");
    if let Input::Chat { messages } = &mut call.input {
        messages[0].tool_calls = vec![retro_fleet_schemas::tools::call_of("r", 0, "add", "{}".into())];
    }
    assert_eq!(field(&call), Some("input.messages.tool_calls"), "only an assistant calls");
    // the tools' bytes count against the size limit
    let mut big = chat("user");
    big.params.tools = tools(&["add"]);
    let e = big.validate(big.input.text_len() + 5).unwrap_err();
    assert_eq!((e.code, e.field), (ErrorCode::PromptTooLarge, Some("params.tools")));
}
