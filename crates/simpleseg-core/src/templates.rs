//! Question and answer templates of the released SimpleSeg data script, and the prompt the
//! official example and evaluations use.

/// The prompt of the official example, used for evaluation and `segment`.
pub const DEFAULT_PROMPT: &str = "Output the polygon coordinates of {query} in the image.";

/// Question templates; `{q}` stands for the referring expression.
pub const QUESTION_TEMPLATES: [&str; 7] = [
    "\"{q}\"'s polygon",
    "What is the polygon of {q} in the image?",
    "Output the polygon coordinates of {q} in the image.",
    "Tell me the polygon coordinates of {q} in the image.",
    "Give me the polygon coordinates of {q} in the image.",
    "Help me locate the polygon of {q}.",
    "Locate the polygon of {q}.",
];

/// Answer templates; `{a}` stands for the polygon list. The first appears twice in the script,
/// which makes it twice as likely.
pub const ANSWER_TEMPLATES: [&str; 5] = [
    "{a}.",
    "{a}.",
    "Sure, you can find it at {a}.",
    "It is found at {a}.",
    "It is at {a}.",
];

/// The point -> mask question of the data script (`{point}`: `[x, y]`, normalized).
pub const POINT_PROMPT: &str = "Show me the contour of the object at point {point}.";

/// The box -> mask question of the data script (`{box}`: `[x1, y1, x2, y2]`, normalized).
pub const BOX_PROMPT: &str = "Give the polygon vertices of the stuff within the box region {box}.";

/// Numbers as a Python list prints them (`[0.5, 0.25]`), as the data script writes them into
/// questions.
pub fn list_repr(values: &[f64]) -> String {
    let parts: Vec<String> = values
        .iter()
        .map(|v| crate::pyrepr::float_repr(*v))
        .collect();
    format!("[{}]", parts.join(", "))
}

/// The point -> mask question for a normalized point.
pub fn point_prompt(point: [f64; 2]) -> String {
    POINT_PROMPT.replace("{point}", &list_repr(&point))
}

/// The box -> mask question for a normalized box.
pub fn box_prompt(b: [f64; 4]) -> String {
    BOX_PROMPT.replace("{box}", &list_repr(&b))
}

/// Fills `{query}` in a prompt template such as [`DEFAULT_PROMPT`].
pub fn fill_prompt(template: &str, query: &str) -> String {
    template.replace("{query}", query)
}

/// Fills question template `index` (wrapping) with a referring expression.
pub fn question(index: usize, query: &str) -> String {
    QUESTION_TEMPLATES[index % QUESTION_TEMPLATES.len()].replace("{q}", query)
}

/// Fills answer template `index` (wrapping) with a polygon list string.
pub fn answer(index: usize, polygons: &str) -> String {
    ANSWER_TEMPLATES[index % ANSWER_TEMPLATES.len()].replace("{a}", polygons)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_templates() {
        assert_eq!(
            fill_prompt(DEFAULT_PROMPT, "the man in red"),
            "Output the polygon coordinates of the man in red in the image."
        );
        assert_eq!(question(0, "cat"), "\"cat\"'s polygon");
        assert_eq!(answer(2, "[]"), "Sure, you can find it at [].");
    }
}
