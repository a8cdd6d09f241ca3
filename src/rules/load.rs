//! Reading rule files from disk: the only I/O of the rules engine.

use std::fs;
use std::io;
use std::path::Path;

use crate::rules::error::{RuleError, RuleErrorKind};

/// Reads the rule sources at `path`: every `*.toml` file of a directory (not recursive, sorted by
/// file name), or the one file `path` names.
///
/// Returns `(file name for messages, text)` pairs and the errors met; a file that cannot be read is
/// reported and skipped so that the other files are still checked.
pub(crate) fn read_sources(path: &Path) -> (Vec<(String, String)>, Vec<RuleError>) {
    let mut sources = Vec::new();
    let mut errors = Vec::new();
    let io_error = |file: &Path, source: io::Error| RuleError {
        file: file.display().to_string(),
        line: None,
        rule: None,
        kind: RuleErrorKind::Io { source },
    };
    if !path.is_dir() {
        match fs::read_to_string(path) {
            Ok(text) => sources.push((path.display().to_string(), text)),
            Err(source) => errors.push(io_error(path, source)),
        }
        return (sources, errors);
    }
    let files = fs::read_dir(path).and_then(|entries| {
        let mut files = Vec::new();
        for entry in entries {
            let file = entry?.path();
            if file.extension().is_some_and(|ext| ext == "toml") && file.is_file() {
                files.push(file);
            }
        }
        Ok(files)
    });
    let mut files = match files {
        Ok(files) => files,
        Err(source) => {
            errors.push(io_error(path, source));
            return (sources, errors);
        }
    };
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    if files.is_empty() {
        errors.push(RuleError {
            file: path.display().to_string(),
            line: None,
            rule: None,
            kind: RuleErrorKind::NoRuleFiles,
        });
    }
    for file in files {
        match fs::read_to_string(&file) {
            Ok(text) => sources.push((file.display().to_string(), text)),
            Err(source) => errors.push(io_error(&file, source)),
        }
    }
    (sources, errors)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use crate::rules::{RuleErrorKind, RuleSet};

    /// A fresh directory for one test, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(test: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("invalidator-rules-{}-{test}", std::process::id()));
            // A leftover from an earlier run with the same pid would change the result.
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const RULE: &str = "[[rule]]\ntable = \"t\"\nkeys = [\"k:{id}\"]\n";

    #[test]
    fn loads_every_toml_file_of_a_directory_in_name_order() {
        let dir = TempDir::new("dir");
        dir.write("b.toml", RULE);
        dir.write("a.toml", &format!("{RULE}{RULE}"));
        dir.write("notes.md", "not rules");
        dir.write("c.toml.bak", "not rules either");
        std::fs::create_dir(dir.0.join("nested")).unwrap();
        dir.write("nested/d.toml", "[[rule]] broken");
        let set = RuleSet::load(&dir.0).unwrap();
        let names: Vec<&str> = set.rules().iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a#1", "a#2", "b#1"]);
        let a = dir.0.join("a.toml").display().to_string();
        assert_eq!(set.rules()[0].file, a);
    }

    #[test]
    fn loads_a_single_file() {
        let dir = TempDir::new("file");
        let path = dir.write("only.rules", RULE);
        let set = RuleSet::load(&path).unwrap();
        assert_eq!(set.rules()[0].name, "only#1");
        assert_eq!(set.rules()[0].file, path.display().to_string());
    }

    #[test]
    fn an_empty_directory_is_an_error() {
        let dir = TempDir::new("empty");
        dir.write("README.md", "rules go here");
        let errors = RuleSet::load(&dir.0).unwrap_err();
        assert_eq!(
            errors.to_string(),
            format!(
                "{}: no *.toml rule files in this directory",
                dir.0.display()
            )
        );
    }

    #[test]
    fn a_missing_path_is_an_error_naming_it() {
        let dir = TempDir::new("missing");
        let path = dir.0.join("nope.toml");
        let errors = RuleSet::load(&path).unwrap_err();
        let error = &errors.errors()[0];
        assert_eq!(error.file, path.display().to_string());
        assert!(matches!(error.kind, RuleErrorKind::Io { .. }));
        assert!(
            errors
                .to_string()
                .starts_with(&format!("{}: cannot read: ", path.display()))
        );
    }

    #[test]
    fn reports_unreadable_and_broken_files_together() {
        let dir = TempDir::new("broken");
        dir.write("a.toml", "[[rule]]\ntable = \"t\"\nkeys = [\"{\"]\n");
        std::fs::write(dir.0.join("b.toml"), b"\xff\xfe not utf-8").unwrap();
        dir.write("c.toml", RULE);
        dir.write(
            "d.toml",
            "[[rule]]\ntable = \"t\"\non = [\"upsert\"]\nkeys = [\"k\"]\n",
        );
        let errors = RuleSet::load(&dir.0).unwrap_err();
        let files: Vec<(String, Option<usize>)> = errors
            .errors()
            .iter()
            .map(|e| (e.file.rsplit('/').next().unwrap().to_owned(), e.line))
            .collect();
        assert_eq!(
            files,
            [
                ("a.toml".to_owned(), Some(3)),
                ("b.toml".to_owned(), None),
                ("d.toml".to_owned(), Some(3)),
            ]
        );
    }
}
