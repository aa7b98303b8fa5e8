"""What the tests share: local servers for images, webhooks and S3, test images, the
service and its workers as real processes, a storage with a full disk."""
