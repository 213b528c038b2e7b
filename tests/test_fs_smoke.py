def test_smoke(mounted_fs):
    p = mounted_fs.path("x")
    with open(p, "w") as f:
        f.write("hi")
    assert open(p).read() == "hi"
    mounted_fs.umount()
    mounted_fs.mount()
    assert open(p).read() == "hi"
