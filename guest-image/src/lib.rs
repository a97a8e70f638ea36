//! Builds the guest kernel + initramfs image from Debian packages.
