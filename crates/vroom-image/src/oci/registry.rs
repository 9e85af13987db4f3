//! The registry transport (`docker://`): not yet.

use std::io::Read;

use super::{Chosen, Descriptor, ImportImageError, Transport};

pub struct Registry;

impl Registry {
    pub fn new(
        registry: &str,
        _repository: &str,
        _reference: &str,
        _insecure: bool,
    ) -> Result<Self, ImportImageError> {
        Err(ImportImageError::Registry {
            registry: registry.into(),
            reason: "not supported yet".into(),
        })
    }
}

impl Transport for Registry {
    fn choose(&mut self) -> Result<Chosen, ImportImageError> {
        unreachable!()
    }
    fn open_blob(&mut self, _: &Descriptor) -> Result<Box<dyn Read + '_>, ImportImageError> {
        unreachable!()
    }
}
