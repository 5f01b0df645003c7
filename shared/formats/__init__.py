"""Readers of the data formats a job spec can name: libsvm, delimited text, ``.npy`` and ``.npz``.

Each reader parses one part of a source: a byte range of a text file, a row range of a
``.npy`` matrix, or a whole file. :mod:`shared.preparation` chains the parts into a
preparation that no single invocation has to hold in memory. Features come out as
float32, the dtype that the shards store, and labels as float64.

Modules
-------
files
    Opening, decompressing and decoding data files, and the checks every format shares.
libsvm
    libsvm/svmlight text into a CSR matrix.
delimited
    CSV and other delimited numeric text, with an optional header.
npy
    ``.npy`` matrices and ``.npz`` archives.
"""
