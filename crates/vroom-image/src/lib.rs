//! vroom images: where the guest kernel comes from, how an image is packed,
//! and the content-addressed store that holds images.

pub mod apt;
pub mod build;
pub mod builtin;
pub mod cpio;
pub mod init_check;
mod inroot;
pub mod kernel;
pub mod oci;
pub mod pack;
pub mod recipe;
pub mod source;
pub mod store;
mod util;

pub use builtin::{catalog, in_catalog, write_bundled_recipe, BuildImageError};
pub use kernel::{
    BuildKernelError, FetchKernelError, Fragment, Kernel, KernelCache, KernelChoice, KernelModules,
    OwnKernel, FRAGMENT,
};
pub use source::LocalImages;
pub use store::{ImageStore, ImageStoreError, StoredImage};
pub use util::sha256_file;
