import pytest

from pipeline.media.manifest import ManifestError, read_manifest


def write(tmp_path, text):
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    return path


def test_reads_rows_and_resolves_paths(tmp_path):
    path = write(
        tmp_path,
        "video_id,path,label,split,start_sec,end_sec\na,v/a.mp4,x,train,,\nb,/abs/b.mp4,y,test,1.5,3\n",
    )
    a, b = read_manifest(path)
    assert a.path == tmp_path / "v/a.mp4" and a.start_sec is None
    assert str(b.path) == "/abs/b.mp4" and (b.start_sec, b.end_sec) == (1.5, 3.0)


@pytest.mark.parametrize(
    "text,needle",
    [
        ("video_id,path,label\na,a.mp4,x\n", "missing column(s) split"),
        (
            "video_id,path,label,split\na,a.mp4,x,train\na,b.mp4,x,val\n",
            "duplicate video_id 'a' (first on line 2)",
        ),
        ("video_id,path,label,split\na,a.mp4,x,holdout\n", "split 'holdout' is not one of"),
        ("video_id,path,label,split\na,,x,train\n", "empty path"),
        (
            "video_id,path,label,split,start_sec,end_sec\na,a.mp4,x,train,3,1\n",
            "end_sec 1.0 is not after start_sec 3.0",
        ),
        ("video_id,path,label,split,start_sec\na,a.mp4,x,train,soon\n", "not a number: 'soon'"),
        ("video_id,path,label,split\n", "no rows"),
    ],
)
def test_problems_are_reported_with_file_and_line(tmp_path, text, needle):
    with pytest.raises(ManifestError) as err:
        read_manifest(write(tmp_path, text))
    assert needle in str(err.value)
    assert "manifest.csv" in str(err.value)


def test_all_problems_listed_at_once(tmp_path):
    path = write(tmp_path, "video_id,path,label,split\na,a.mp4,x,train\na,a.mp4,x,train\nb,b.mp4,x,nope\n")
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    assert "2 problem(s)" in str(err.value) and ":3:" in str(err.value) and ":4:" in str(err.value)


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv")
