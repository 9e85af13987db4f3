//! A cluster lab (`vroom_lab`) for the end-to-end tests, with the
//! assertions they use; its logs are printed when a test fails.

use std::path::Path;
use std::process::Output;

use super::{init_binary, vroom_bin};

/// The lab of `vroom_lab`, with the assertions the tests use.
pub struct Lab(vroom_lab::Lab);

impl std::ops::Deref for Lab {
    type Target = vroom_lab::Lab;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Lab {
    /// `nodes` nodes whose names start with `letter` (one per test file,
    /// so that a leftover is known), running vroom with `env` beside the
    /// test's guest init.
    pub fn new(letter: char, nodes: usize, env: Vec<(String, String)>) -> Lab {
        let mut all = vec![(
            "VROOM_INIT".to_string(),
            init_binary().display().to_string(),
        )];
        all.extend(env);
        Lab(vroom_lab::Lab::build(Path::new(vroom_bin()), letter, nodes, all).unwrap())
    }

    pub fn start(&self, i: usize) {
        self.0.start(i).unwrap();
    }

    pub fn vroom(&self, i: usize, args: &[&str]) -> Output {
        self.command(i).args(args).output().unwrap()
    }

    pub fn ok(&self, i: usize, args: &[&str]) -> String {
        let out = self.vroom(i, args);
        assert!(
            out.status.success(),
            "vroom {args:?} on {}: {}\n--- log:\n{}",
            self.nodes[i].name,
            String::from_utf8_lossy(&out.stderr),
            self.log(i)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn fail(&self, i: usize, args: &[&str]) -> String {
        let out = self.vroom(i, args);
        assert!(!out.status.success(), "vroom {args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        err
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (i, node) in self.nodes.iter().enumerate() {
                eprintln!("--- vroomd log of {}:\n{}", node.name, self.log(i));
            }
        }
    }
}
