"""The input path, after the wire schema has parsed a request: media read under the operator's policy
(media_reader, files, urls), texts cut and tokenised fast (pieces, fastpath), and images and videos
made into a batch's pixels (media/)."""
