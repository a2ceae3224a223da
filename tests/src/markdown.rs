//! What a Markdown page of the docs shows as commands, for the test that keeps every one of
//! them working (`tests/tests/docs.rs`): fenced blocks with their language and the
//! `<!-- checked-by: … -->` marker above them, indented code blocks (which the docs do not
//! use: a command there would escape the test), inline code spans, and a shell line split
//! into the commands it runs.

/// The languages of a fenced block that holds commands.
pub const SHELL_LANGUAGES: &[&str] = &["sh", "bash", "shell", "console", "zsh", "shell-session"];

/// A fenced code block.
#[derive(Debug, PartialEq, Eq)]
pub struct Fence {
    /// The line of the opening fence (1-based).
    pub line: usize,
    /// The info string's first word (`sh`, `toml`, `text`); empty when the fence has none.
    pub language: String,
    pub body: Vec<String>,
    /// What `<!-- checked-by: … -->` on the last non-blank line above the fence names.
    pub checked_by: Option<String>,
}

impl Fence {
    pub fn is_shell(&self) -> bool {
        SHELL_LANGUAGES.contains(&self.language.as_str())
    }
}

/// A page's fenced blocks, the first line of each indented code block, and its inline code
/// spans outside fences (line of the opening backtick, text with line breaks as spaces).
#[derive(Debug, Default)]
pub struct Page {
    pub fences: Vec<Fence>,
    pub indented_blocks: Vec<usize>,
    pub code_spans: Vec<(usize, String)>,
}

const MARKER_START: &str = "<!-- checked-by:";

pub fn parse(text: &str) -> Page {
    let mut page = Page::default();
    let mut open: Option<(Fence, String)> = None;
    let mut last_non_blank = "";
    let mut previous_blank = true;
    // Within a list, an indented line after a blank one continues the item; not code.
    let mut in_list = false;
    let mut span: Option<(usize, String)> = None;
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let trimmed = line.trim_start();
        if let Some((fence, closing)) = open.as_mut() {
            if trimmed.trim_end() == closing.as_str() {
                page.fences.push(open.take().expect("open").0);
                last_non_blank = line;
                previous_blank = false;
            } else {
                fence.body.push(line.to_string());
            }
            continue;
        }
        if let Some(rest) = trimmed.strip_prefix("```") {
            let closing = format!("```{}", rest.chars().take_while(|&c| c == '`').collect::<String>());
            let language = rest.trim_start_matches('`').split_whitespace().next().unwrap_or_default().to_string();
            let checked_by = last_non_blank
                .trim()
                .strip_prefix(MARKER_START)
                .and_then(|marker| marker.strip_suffix("-->"))
                .map(|marker| marker.trim().to_string());
            open = Some((Fence { line: number, language, body: Vec::new(), checked_by }, closing));
            continue;
        }
        if line.trim().is_empty() {
            previous_blank = true;
            if let Some((_, text)) = span.as_mut() {
                // A blank line ends a paragraph, and an unclosed backtick with it.
                text.clear();
                span = None;
            }
            continue;
        }
        let indented = line.starts_with("    ") || line.starts_with('\t');
        if indented && previous_blank && !in_list {
            page.indented_blocks.push(number);
        }
        if !indented {
            in_list = is_list_item(trimmed) || (in_list && line.starts_with(' '));
        } else if is_list_item(trimmed) {
            in_list = true;
        }
        previous_blank = false;
        last_non_blank = line;
        collect_code_spans(number, line, &mut span, &mut page.code_spans);
    }
    page
}

fn is_list_item(trimmed: &str) -> bool {
    trimmed.starts_with("- ")
        || trimmed.starts_with("* ")
        || trimmed
            .split_once(". ")
            .is_some_and(|(number, _)| !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()))
}

/// Single-backtick spans (the docs use no double ones), across line breaks within a paragraph.
fn collect_code_spans(number: usize, line: &str, span: &mut Option<(usize, String)>, spans: &mut Vec<(usize, String)>) {
    let mut rest = line;
    loop {
        match span.take() {
            Some((start, mut text)) => match rest.split_once('`') {
                Some((inside, after)) => {
                    text.push_str(inside);
                    spans.push((start, text.trim().to_string()));
                    rest = after;
                }
                None => {
                    text.push_str(rest);
                    text.push(' ');
                    *span = Some((start, text));
                    return;
                }
            },
            None => match rest.split_once('`') {
                Some((_, after)) => {
                    *span = Some((number, String::new()));
                    rest = after;
                }
                None => return,
            },
        }
    }
}

/// The commands a shell line runs, each as its words: split at `&&`, `||`, `|`, `;`, `&`
/// and into `$( … )`, without comments, redirections (`< file`, `> file`) or leading
/// `NAME=value` assignments (those are returned apart, see [`assignments`]). Quotes are
/// removed; nothing is expanded.
pub fn commands(line: &str) -> Vec<Vec<String>> {
    command_parts(line).into_iter().map(|(_, words)| words).collect()
}

/// The `NAME=value` assignments in front of each command of `line`, with the command's first word.
pub fn assignments(line: &str) -> Vec<(String, String)> {
    command_parts(line)
        .into_iter()
        .flat_map(|(assigned, words)| {
            let program = words.first().cloned().unwrap_or_default();
            assigned.into_iter().map(move |name| (name, program.clone()))
        })
        .collect()
}

#[derive(Debug, PartialEq)]
enum Token {
    Word(String),
    Operator(&'static str),
}

fn command_parts(line: &str) -> Vec<(Vec<String>, Vec<String>)> {
    let mut parts = Vec::new();
    let mut assigned = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut skip_next_word = false;
    for token in tokens(line) {
        match token {
            Token::Word(word) => {
                if std::mem::take(&mut skip_next_word) {
                    continue;
                }
                let is_assignment = words.is_empty()
                    && word.split_once('=').is_some_and(|(name, _)| {
                        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    });
                if is_assignment {
                    assigned.push(word.split_once('=').expect("checked").0.to_string());
                } else {
                    words.push(word);
                }
            }
            Token::Operator("<" | ">") => skip_next_word = true,
            Token::Operator(_) => {
                if !words.is_empty() || !assigned.is_empty() {
                    parts.push((std::mem::take(&mut assigned), std::mem::take(&mut words)));
                }
            }
        }
    }
    if !words.is_empty() || !assigned.is_empty() {
        parts.push((assigned, words));
    }
    parts.retain(|(_, words)| !words.is_empty());
    parts
}

fn tokens(line: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        let operator = match c {
            '&' if chars.peek() == Some(&'&') => Some("&&"),
            '|' if chars.peek() == Some(&'|') => Some("||"),
            '$' if chars.peek() == Some(&'(') => Some("$("),
            '&' => Some("&"),
            '|' => Some("|"),
            ';' => Some(";"),
            '(' => Some("("),
            ')' => Some(")"),
            '<' => Some("<"),
            '>' => Some(">"),
            _ => None,
        };
        if let Some(operator) = operator {
            if operator.len() == 2 {
                chars.next();
            }
            if let Some(word) = word.take() {
                tokens.push(Token::Word(word));
            }
            tokens.push(Token::Operator(operator));
            continue;
        }
        match c {
            '#' if word.is_none() => break,
            c if c.is_whitespace() => {
                if let Some(word) = word.take() {
                    tokens.push(Token::Word(word));
                }
            }
            '\'' | '"' => {
                let word = word.get_or_insert_with(String::new);
                for inside in chars.by_ref() {
                    if inside == c {
                        break;
                    }
                    word.push(inside);
                }
            }
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    if let Some(word) = word {
        tokens.push(Token::Word(word));
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_markers_indented_blocks_and_spans_are_found() {
        let page = parse(concat!(
            "# Title\n",
            "Run `lockstep-cli\n",
            "sync` or `watch`.\n",
            "\n",
            "<!-- checked-by: scripts/test -->\n",
            "```sh\n",
            "scripts/test\n",
            "```\n",
            "\n",
            "- an item\n",
            "\n",
            "    its continuation\n",
            "  ```toml\n",
            "  a = 1\n",
            "  ```\n",
            "\n",
            "Text.\n",
            "\n",
            "    indented code\n",
            "````\n",
            "```\n",
            "````\n",
        ));
        assert_eq!(page.code_spans, vec![(2, "lockstep-cli sync".to_string()), (3, "watch".to_string())]);
        assert_eq!(page.indented_blocks, vec![19]);
        let languages: Vec<_> = page.fences.iter().map(|fence| (fence.line, fence.language.as_str())).collect();
        assert_eq!(languages, vec![(6, "sh"), (13, "toml"), (20, "")]);
        assert_eq!(page.fences[0].checked_by.as_deref(), Some("scripts/test"));
        assert_eq!(page.fences[0].body, vec!["scripts/test".to_string()]);
        assert!(page.fences[0].is_shell() && !page.fences[1].is_shell());
        assert_eq!(page.fences[1].checked_by, None);
        assert_eq!(page.fences[2].body, vec!["```".to_string()]);
    }

    #[test]
    fn a_shell_line_is_split_into_its_commands() {
        let words = |line: &str| commands(line);
        assert_eq!(
            words(r#"$cli --store "$dir/a.db" pair show | tee code.txt   # a comment"#),
            vec![vec!["$cli", "--store", "$dir/a.db", "pair", "show"], vec!["tee", "code.txt"]]
        );
        assert_eq!(
            words("cargo build -p x && cli=target/release/lockstep-cli"),
            vec![vec!["cargo", "build", "-p", "x"]]
        );
        assert_eq!(
            words("id=$($cli --json list | python3 -c 'import json; print(1)')"),
            vec![vec!["$cli", "--json", "list"], vec!["python3", "-c", "import json; print(1)"]]
        );
        assert_eq!(
            words("$cli pair redeem --name phone < code.txt && rm code.txt"),
            vec![vec!["$cli", "pair", "redeem", "--name", "phone"], vec!["rm", "code.txt"]]
        );
        assert_eq!(
            assignments("LOCKSTEP_KAFKA_BROKERS=k:9092 scripts/run"),
            vec![("LOCKSTEP_KAFKA_BROKERS".to_string(), "scripts/run".to_string())]
        );
    }
}
