//! Where a field is in the config text: the 1-based line of a field path, so that an error
//! found after parsing (a broken rule rather than a wrong type) still points at its line.

/// One step of a field path: a mapping key or a sequence index.
#[derive(Clone, Copy)]
pub(crate) enum PathPart {
    Key(&'static str),
    Index(usize),
}

/// The path as errors print it: `services[0].backends[2].weight`.
pub(crate) fn render_path(path: &[PathPart]) -> String {
    let mut out = String::new();
    for part in path {
        match part {
            PathPart::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            PathPart::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Finds the 1-based line of a field in block-style YAML (the style of every example config).
/// serde_yaml reports lines for syntax and type errors only; semantic checks use this. Returns
/// `None` where the text does not look like plain block YAML, and the error goes without a line.
pub(crate) fn locate(text: &str, path: &[PathPart]) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    // The window of lines the current node spans, and the indentation its children have at least.
    let (mut start, mut end, mut min_indent) = (0usize, lines.len(), 0usize);
    let mut found = None;
    for part in path {
        match part {
            PathPart::Key(key) => {
                let (line, indent) = (start..end).find_map(|n| {
                    let l = lines[n];
                    let body = l.trim_start();
                    let indent = l.len() - body.len();
                    let body = body.strip_prefix("- ").map(str::trim_start).unwrap_or(body);
                    let indent = if l.trim_start().starts_with("- ") {
                        l.len() - body.len()
                    } else {
                        indent
                    };
                    (indent >= min_indent
                        && body
                            .strip_prefix(key)
                            .is_some_and(|r| r.trim_start().starts_with(':')))
                    .then_some((n, indent))
                })?;
                found = Some(line);
                start = line + 1;
                // The value ends where a line is indented no deeper than the key.
                end = (start..end)
                    .find(|&n| {
                        let l = lines[n];
                        let t = l.trim_start();
                        !t.is_empty()
                            && !t.starts_with('#')
                            && l.len() - t.len() <= indent
                            && !(t.starts_with("- ") && l.len() - t.len() == indent)
                    })
                    .unwrap_or(end);
                min_indent = indent;
            }
            PathPart::Index(i) => {
                let items: Vec<(usize, usize)> = (start..end)
                    .filter_map(|n| {
                        let l = lines[n];
                        let t = l.trim_start();
                        t.starts_with("- ").then_some((n, l.len() - t.len()))
                    })
                    .collect();
                let item_indent = items.iter().map(|(_, ind)| *ind).min()?;
                let items: Vec<usize> = items
                    .into_iter()
                    .filter(|(_, ind)| *ind == item_indent)
                    .map(|(n, _)| n)
                    .collect();
                let line = *items.get(*i)?;
                found = Some(line);
                start = line;
                end = items.get(i + 1).copied().unwrap_or(end);
                min_indent = item_indent;
            }
        }
    }
    found.map(|n| n + 1)
}

#[cfg(test)]
mod tests {
    use super::{PathPart::Index as I, PathPart::Key as K, *};

    const TEXT: &str = "\
interface: lo
services:
  - name: web
    # a comment between keys
    stick:
      timeout: 2s
    backends:
      - name: a
        weight: 1
      -   name: b
          weight: 2
  - name: api
    backends:
      - name: c
        weight: 0
";

    #[test]
    fn paths_render_as_errors_print_them() {
        let path = [K("services"), I(0), K("backends"), I(1), K("weight")];
        assert_eq!(render_path(&path), "services[0].backends[1].weight");
    }

    #[test]
    fn keys_and_items_are_found_on_their_lines() {
        assert_eq!(locate(TEXT, &[K("interface")]), Some(1));
        let timeout = [K("services"), I(0), K("stick"), K("timeout")];
        assert_eq!(locate(TEXT, &timeout), Some(6));
        let weight = [K("services"), I(0), K("backends"), I(1), K("weight")];
        assert_eq!(locate(TEXT, &weight), Some(11));
        let weight = [K("services"), I(1), K("backends"), I(0), K("weight")];
        assert_eq!(locate(TEXT, &weight), Some(15));
        assert_eq!(locate(TEXT, &[K("services"), I(1)]), Some(12));
    }

    #[test]
    fn a_field_not_written_has_no_line() {
        assert_eq!(locate(TEXT, &[K("services"), I(2)]), None);
        assert_eq!(locate(TEXT, &[K("services"), I(1), K("stick")]), None);
    }
}
