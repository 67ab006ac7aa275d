"""What people look at: the HTML report (:mod:`.build`, its kinds of source :mod:`.sources`,
its page :mod:`.page`) and saliency maps (:mod:`.saliency`)."""
