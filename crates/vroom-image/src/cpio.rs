//! A writer for the `newc` cpio format, the format of Linux initramfs images.
//!
//! Entries are written exactly as given, with fixed timestamps and owners, so
//! the output is reproducible. Each header is 110 ASCII bytes: the magic
//! `070701` then 13 eight-digit hex fields; the name and the data are each
//! padded to four bytes. The archive ends with a `TRAILER!!!` entry.

use std::io::{self, Write};

pub struct CpioWriter<W: Write> {
    out: W,
    offset: u64,
    next_ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            offset: 0,
            next_ino: 1,
        }
    }

    pub fn dir(&mut self, path: &str) -> io::Result<()> {
        self.entry(path, S_IFDIR | 0o755, 0, b"")
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | mode, 0, data)
    }

    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, S_IFCHR | mode, (major << 8) | minor, b"")
    }

    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, 0, b"")?;
        Ok(self.out)
    }

    fn entry(&mut self, path: &str, mode: u32, rdev: u32, data: &[u8]) -> io::Result<()> {
        let name_len = path.len() + 1;
        let ino = if path == "TRAILER!!!" {
            0
        } else {
            self.next_ino
        };
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev >> 8,
            rdev & 0xff,
            name_len as u32,
            0, // check
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        self.write(header.as_bytes())?;
        self.write(path.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let rem = (4 - (self.offset % 4) as usize) % 4;
        self.write(&[0u8; 3][..rem])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_aligned_and_terminated() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("dev").unwrap();
        w.file("init", 0o755, b"abcde").unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("init\0"));
        assert!(text.contains("abcde"));
        assert!(text.contains("TRAILER!!!\0"));
        // Second header ("init") starts right after the padded first entry: 110 + 4 ("dev\0") = 114 -> 116.
        assert_eq!(&out[116..122], b"070701");
        // Its file size field (7th field) is 5.
        assert_eq!(&out[116 + 6 + 6 * 8..116 + 6 + 7 * 8], b"00000005");
    }

    #[test]
    fn same_input_same_bytes() {
        let build = || {
            let mut w = CpioWriter::new(Vec::new());
            w.file("a", 0o644, b"x").unwrap();
            w.finish().unwrap()
        };
        assert_eq!(build(), build());
    }
}
