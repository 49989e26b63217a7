"""Model cache: Hub references, the parallel downloader, the Hugging Face cache layout."""
